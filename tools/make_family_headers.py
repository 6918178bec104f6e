#!/usr/bin/env python3
"""Generates tests/fixtures/single-file/families/*.json.gz: the tensor names, shapes and
dtypes of full-size single-file checkpoints of each family hybridiff loads (SD 1.x, SD 2.x,
SDXL base) and of some it refuses (SDXL refiner, SD 1.x inpainting), with the diffusers
names and shapes each component must come out as. No weights: the models are built on
PyTorch's meta device from the published configs (crates/hybridiff-engine/src/families/),
and the original names come from tools/ldm_layout.py. diffusers checks both here: its
`infer_diffusers_model_type` must name the family, and its own conversions
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) must turn the names back into the diffusers ones.

The tests write a safetensors header with these names and shapes over a sparse file of the
full size (gigabytes that take no disk) and check detection and name mapping without
reading any tensor data (crates/hybridiff-engine/tests/single_file_families.rs).

Run from the repository root:
    /work/venv/bin/python tools/make_family_headers.py
"""

import gzip
import io
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_layout  # noqa: E402
from ldm_layout import Shape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ROOT / "crates" / "hybridiff-engine" / "src" / "families"
OUT = ROOT / "tests" / "fixtures" / "single-file" / "families"


class MetaShape(Shape):
    """Enough of a tensor for diffusers' conversion functions (slicing rows, .T, ndim)."""

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def T(self):
        return MetaShape(tuple(reversed(self.shape)), self.dtype)

    def t(self):
        return self.T

    def reshape(self, *shape):
        return MetaShape(shape, self.dtype)

    def contiguous(self):
        return self

    def clone(self):
        return self

    def detach(self):
        return self

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        shape = []
        for i, d in enumerate(self.shape):
            s = idx[i] if i < len(idx) else slice(None)
            if isinstance(s, int):
                continue
            shape.append(len(range(*s.indices(d))))
        return MetaShape(tuple(shape), self.dtype)


def shapes(module) -> dict:
    return {k: MetaShape(tuple(v.shape)) for k, v in module.state_dict().items()}


def build(cfg: dict):
    unet_cfg = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in cfg["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        texts = []
        for key in ["text_encoder", "text_encoder_2"]:
            if key in cfg:
                c = dict(cfg[key])
                proj = "CLIPTextModelWithProjection" in c.pop("architectures", [])
                c.pop("model_type", None)
                texts.append((key, (CLIPTextModelWithProjection if proj else CLIPTextModel)(
                    CLIPTextConfig(**c))))
    return unet, unet_cfg, vae, vae_cfg, texts


def family(name: str, cfg: dict, text_kinds: list, extra=None, tweak=None):
    unet, unet_cfg, vae, vae_cfg, texts = build(cfg)
    t_in = []
    for (key, model), kind in zip(texts, text_kinds):
        sd = shapes(model)
        opts = None
        if kind == "open_clip_sd2":
            # SD 2.x files hold OpenCLIP's 24 layers and its projection; the encoder uses 23.
            h = model.config.hidden_size

            def pad(i, h=h, inter=model.config.intermediate_size):
                base = f"transformer.resblocks.{i}."
                out = {base + "attn.in_proj_weight": MetaShape((3 * h, h)),
                       base + "attn.in_proj_bias": MetaShape((3 * h,)),
                       base + "attn.out_proj.weight": MetaShape((h, h)),
                       base + "attn.out_proj.bias": MetaShape((h,)),
                       base + "mlp.c_fc.weight": MetaShape((inter, h)),
                       base + "mlp.c_fc.bias": MetaShape((inter,)),
                       base + "mlp.c_proj.weight": MetaShape((h, inter)),
                       base + "mlp.c_proj.bias": MetaShape((h,))}
                for ln in ["ln_1", "ln_2"]:
                    out[base + ln + ".weight"] = MetaShape((h,))
                    out[base + ln + ".bias"] = MetaShape((h,))
                if i == 23:
                    out["text_projection"] = MetaShape((h, h))
                return out
            opts = dict(layers_in_file=24, pad_layer=pad)
        t_in.append((kind, sd, opts))
    ckpt = ldm_layout.to_single_file(shapes(unet), unet_cfg, shapes(vae), vae_cfg, t_in)
    for kind in text_kinds:
        prefix = ldm_layout.TEXT_PREFIX[kind]
        if kind.startswith("open_clip"):
            ckpt[prefix + "logit_scale"] = MetaShape(())
        else:
            ckpt[prefix + "text_model.embeddings.position_ids"] = MetaShape((1, 77), "I64")
    if extra:
        ckpt.update(extra)
    if tweak:
        tweak(ckpt)
    expected = {"unet": {k: list(v.shape) for k, v in shapes(unet).items()},
                "vae": {k: list(v.shape) for k, v in shapes(vae).items()}}
    for key, model in texts:
        sd = shapes(model)
        expected[key] = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k):
                         list(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}
    # diffusers' own conversions must give those names and shapes back.
    got = sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg)
    assert {k: list(v.shape) for k, v in got.items()} == expected["unet"], name
    got = sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg)
    assert {k: list(v.shape) for k, v in got.items()} == expected["vae"], name
    for (key, model), kind in zip(texts, text_kinds):
        if kind.startswith("open_clip"):
            got = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=ldm_layout.TEXT_PREFIX[kind])
        else:
            got = sfu.convert_ldm_clip_checkpoint(ckpt, ldm_layout.TEXT_PREFIX[kind])
            got = {k: v for k, v in got.items() if not k.startswith(("conditioner.", "cond_stage"))}
        got = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): list(v.shape)
               for k, v in got.items() if not k.endswith("position_ids") and k != "logit_scale"}
        assert got == expected[key], (name, key, set(got) ^ set(expected[key]))
    return ckpt, expected


def write(name: str, ckpt: dict, expected: dict | None, diffusers_type: str, note: str) -> None:
    mt = sfu.infer_diffusers_model_type(ckpt)
    assert mt == diffusers_type, (name, mt)
    doc = {"family": name, "diffusers_model_type": mt, "note": note,
           "tensors": [[k, list(v.shape), v.dtype] for k, v in sorted(ckpt.items())],
           "diffusers": expected}
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(json.dumps(doc, separators=(",", ":")).encode())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json.gz").write_bytes(buf.getvalue())
    n = sum(1 for _ in ckpt)
    print(f"{name}: {n} tensors, diffusers type {mt}, {len(buf.getvalue())} bytes")


def main() -> None:
    cfg = {f: json.loads((FAMILIES / f"{f}.json").read_text()) for f in ["sd1", "sd2", "sdxl"]}
    ckpt, exp = family("sd1", cfg["sd1"], ["clip_sd1"])
    write("sd1", ckpt, exp, "v1", "SD 1.x (v1-5-pruned-emaonly layout)")
    ckpt, exp = family("sd2", cfg["sd2"], ["open_clip_sd2"])
    write("sd2", ckpt, exp, "v2", "SD 2.x (OpenCLIP ViT-H, 24 layers in the file)")
    ckpt, exp = family("sdxl", cfg["sdxl"], ["clip_sdxl", "open_clip_sdxl"])
    write("sdxl", ckpt, exp, "xl_base", "SDXL base 1.0")
    # Refused families. Inpainting: SD 1.x with 9 input channels.
    inpaint = json.loads(json.dumps(cfg["sd1"]))
    inpaint["unet"]["in_channels"] = 9
    ckpt, _ = family("sd1_inpainting", inpaint, ["clip_sd1"])
    write("sd1_inpainting", ckpt, None, "inpainting", "SD 1.x inpainting (refused)")
    # SDXL refiner: its U-Net (384 channels) and one OpenCLIP bigG at embedders.0.
    refiner = json.loads(json.dumps(cfg["sdxl"]))
    refiner["unet"].update(block_out_channels=[384, 768, 1536, 1536],
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D", "DownBlock2D"],
                           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D",
                                           "CrossAttnUpBlock2D", "UpBlock2D"],
                           attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280,
                           transformer_layers_per_block=4,
                           projection_class_embeddings_input_dim=2560)
    refiner["text_encoder"] = refiner.pop("text_encoder_2")
    unet, unet_cfg, vae, vae_cfg, texts = build(refiner)
    t_in = [("open_clip_sdxl", shapes(texts[0][1]), None)]
    ckpt = ldm_layout.to_single_file(shapes(unet), unet_cfg, shapes(vae), vae_cfg, t_in)
    ckpt = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in ckpt.items()}
    write("sdxl_refiner", ckpt, None, "xl_refiner", "SDXL refiner 1.0 (refused)")


if __name__ == "__main__":
    main()
