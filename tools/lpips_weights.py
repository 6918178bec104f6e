#!/usr/bin/env python3
"""LPIPS (AlexNet) weights for `hybridiff compare --lpips` and `hybridiff tune --max-lpips`.

Two commands:

  convert  Writes the weights file a user needs, from torchvision's AlexNet checkpoint and
           the linear heads that ship inside the `lpips` wheel:

             pip install lpips torchvision safetensors
             # torchvision's ImageNet AlexNet (what lpips.LPIPS(net='alex') downloads):
             #   https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
             python tools/lpips_weights.py convert --alexnet alexnet-owt-7be5be79.pth \
                 --out lpips-alex.safetensors

           Names in the file: torchvision's `features.{0,3,6,8,10}.{weight,bias}` (the five
           convolutions) and the package's `lin{0..4}.model.1.weight` (heads, [1, C, 1, 1]).
           It then prints the `lpips` package's distance of two fixed test images, to compare
           with `hybridiff compare --lpips lpips-alex.safetensors` on the same pair (written
           next to --out as lpips-check-{a,b}/pair.png).

  fixture  Writes tests/fixtures/lpips/ for the parity test: the real heads from the wheel
           (`heads.safetensors`), image pairs (`a/*.png`, `b/*.png`) and the `lpips`
           package's distances for them (`expected.json`), computed with a *seeded random*
           AlexNet backbone (torchvision's weights cannot be downloaded here). The backbone
           is not stored (10 MB): both sides rebuild it from `seeded_backbone` below, which
           `hybridiff_models::lpips::seeded_backbone` reproduces bit for bit (SplitMix64 over
           FNV-1a of the tensor name; uniform in +-1/sqrt(fan_in), PyTorch's default range).

Run: /work/venv/bin/python tools/lpips_weights.py fixture   (needs torch, torchvision, lpips,
numpy, pillow, safetensors; `lpips` and `torchvision` install with pip --no-deps)
"""

import argparse
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (torchvision features index, in, out, kernel)
ALEX = [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]
FIXTURE_SEED = 2026


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def seeded_uniform(name, n, fan_in, seed):
    """n float32 values uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)): SplitMix64 stream i of
    (FNV-1a(name) ^ seed), top 24 bits as u in [0, 1), value (2u - 1) * bound in float32."""
    with np.errstate(over="ignore"):
        base = np.uint64(fnv1a(name) ^ seed)
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = base + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) / np.float32(16777216.0)
    bound = np.float32(1.0) / np.sqrt(np.float32(fan_in))
    return ((np.float32(2.0) * u - np.float32(1.0)) * bound).astype(np.float32)


def seeded_backbone(seed):
    out = {}
    for idx, cin, cout, k in ALEX:
        fan_in = cin * k * k
        w = f"features.{idx}.weight"
        b = f"features.{idx}.bias"
        out[w] = seeded_uniform(w, cout * cin * k * k, fan_in, seed).reshape(cout, cin, k, k)
        out[b] = seeded_uniform(b, cout, fan_in, seed)
    return out


def lpips_heads():
    import lpips
    import torch

    path = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    sd = torch.load(path, map_location="cpu")
    return {f"lin{i}.model.1.weight": sd[f"lin{i}.model.1.weight"].float().numpy() for i in range(5)}


def lpips_model(backbone, heads):
    """The package's LPIPS(net='alex') with these weights (no download: pnet_rand=True)."""
    import warnings

    import lpips
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lpips.LPIPS(net="alex", pnet_rand=True, pretrained=True, verbose=False)
    sd = m.state_dict()
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    for idx, s in slice_of.items():
        for p in ("weight", "bias"):
            sd[f"net.slice{s}.{idx}.{p}"] = torch.from_numpy(np.ascontiguousarray(backbone[f"features.{idx}.{p}"]))
    for i in range(5):
        sd[f"lin{i}.model.1.weight"] = torch.from_numpy(heads[f"lin{i}.model.1.weight"])
    m.load_state_dict(sd, strict=False)
    return m.eval()


def distance(model, a, b):
    import lpips
    import torch

    with torch.no_grad():
        return float(model(lpips.im2tensor(a), lpips.im2tensor(b)).flatten()[0])


def test_pairs():
    """Structured images and perturbed copies, at several sizes (the smallest side LPIPS
    takes is 31)."""
    rng = np.random.default_rng(7)
    pairs = {}
    for name, (h, w), noise in [("grad-64", (64, 64), 10), ("blocks-64", (64, 64), 30),
                                ("odd-47x36", (36, 47), 20), ("min-31", (31, 31), 15),
                                ("wide-40x96", (40, 96), 5)]:
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                      ((xx // 8 + yy // 8) % 2) * 200 + 30], axis=-1).astype(np.float64)
        if name.startswith("blocks"):
            a[h // 4:h // 2, w // 4:3 * w // 4] = [220, 40, 40]
        b = a + rng.normal(0, noise, size=a.shape)
        b[: h // 3, : w // 3] = b[: h // 3, : w // 3][:, ::-1]
        pairs[name] = (np.clip(a, 0, 255).astype(np.uint8), np.clip(b, 0, 255).round().astype(np.uint8))
    return pairs


def fixture(out):
    import lpips
    import torch
    from PIL import Image
    from safetensors.numpy import save_file

    heads = lpips_heads()
    model = lpips_model(seeded_backbone(FIXTURE_SEED), heads)
    (out / "a").mkdir(parents=True, exist_ok=True)
    (out / "b").mkdir(parents=True, exist_ok=True)
    save_file(heads, str(out / "heads.safetensors"))
    expected = {}
    for name, (a, b) in test_pairs().items():
        Image.fromarray(a).save(out / "a" / f"{name}.png")
        Image.fromarray(b).save(out / "b" / f"{name}.png")
        expected[f"{name}.png"] = distance(model, a, b)
        assert distance(model, a, a) == 0.0
    meta = dict(
        distances=expected,
        backbone_seed=FIXTURE_SEED,
        lpips_version=lpips.__version__ if hasattr(lpips, "__version__") else "0.1.4",
        torch_version=torch.__version__,
        note="lpips.LPIPS(net='alex', version='0.1') with the wheel's heads and seeded_backbone(backbone_seed); "
             "images as lpips.im2tensor (x / 127.5 - 1)",
    )
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


def convert(alexnet, out):
    import torch
    from PIL import Image
    from safetensors.numpy import save_file

    sd = torch.load(alexnet, map_location="cpu")
    if "state_dict" in sd:
        sd = sd["state_dict"]
    backbone = {}
    for idx, cin, cout, k in ALEX:
        for p in ("weight", "bias"):
            key = f"features.{idx}.{p}"
            if key not in sd:
                raise SystemExit(f"{alexnet}: no tensor {key}; expected torchvision's AlexNet state dict")
            backbone[key] = sd[key].float().numpy()
        if backbone[f"features.{idx}.weight"].shape != (cout, cin, k, k):
            raise SystemExit(f"{alexnet}: features.{idx}.weight has shape "
                             f"{backbone[f'features.{idx}.weight'].shape}, expected {(cout, cin, k, k)}")
    heads = lpips_heads()
    save_file({**backbone, **heads}, str(out))
    a, b = test_pairs()["blocks-64"]
    check = out.parent
    for d, img in (("lpips-check-a", a), ("lpips-check-b", b)):
        (check / d).mkdir(exist_ok=True)
        Image.fromarray(img).save(check / d / "pair.png")
    d = distance(lpips_model(backbone, heads), a, b)
    print(f"wrote {out}; the lpips package's distance of {check}/lpips-check-a/pair.png and "
          f"lpips-check-b/pair.png: {d:.6f} (hybridiff compare {check}/lpips-check-a {check}/lpips-check-b "
          f"--lpips {out} should print the same within 1e-4)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--alexnet", required=True, type=pathlib.Path, help="torchvision's alexnet-owt-7be5be79.pth")
    c.add_argument("--out", required=True, type=pathlib.Path)
    f = sub.add_parser("fixture")
    f.add_argument("--out", type=pathlib.Path, default=ROOT / "tests" / "fixtures" / "lpips")
    a = ap.parse_args()
    if a.cmd == "convert":
        convert(a.alexnet, a.out)
    else:
        fixture(a.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
