#!/usr/bin/env python3
"""Time diffusers' UNet2DConditionModel forward on CPU (random init, no weights).

Reference numbers for hybridiff's own UNet at equal thread counts. Builds the
model from a diffusers unet/config.json with torch.manual_seed(0), float32,
eval mode, under torch.inference_mode(); one warm-up forward, then --repeats
timed forwards at batch 1 and at batch 2, reporting the median of each.

Example:
    python tools/bench_diffusers.py --threads 1
    python tools/bench_diffusers.py --config tests/fixtures/tiny-sdxl/unet/config.json --latent-size 16
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "sdxl-fifth-unet.json"),
                   help="diffusers unet config.json (default: configs/sdxl-fifth-unet.json)")
    p.add_argument("--latent-size", type=int, default=32, help="latent height = width (default 32)")
    p.add_argument("--context-len", type=int, default=77, help="encoder_hidden_states length (default 77)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size (default 3)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    return p.parse_args()


def main():
    args = parse_args()

    # Thread settings must be in the environment before torch is imported.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import torch
    import diffusers
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    with open(args.config) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()  # float32 by default
    assert next(unet.parameters()).dtype == torch.float32
    n_params = sum(p.numel() for p in unet.parameters())

    s = args.latent_size
    L = args.context_len
    cross_dim = unet.config.cross_attention_dim
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    in_ch = unet.config.in_channels
    text_time = unet.config.addition_embed_type == "text_time"

    def inputs(batch):
        g = torch.Generator().manual_seed(1234 + batch)
        sample = torch.randn(batch, in_ch, s, s, generator=g)
        timestep = torch.tensor([500] * batch, dtype=torch.long)
        ehs = torch.randn(batch, L, cross_dim, generator=g)
        kw = {}
        if text_time:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, generator=g),
                "time_ids": torch.tensor([[s * 8, s * 8, 0, 0, s * 8, s * 8]] * batch, dtype=torch.float32),
            }
        return sample, timestep, ehs, kw

    load_before = os.getloadavg()
    results = {}
    with torch.inference_mode():
        # Warm-up (allocator, oneDNN primitive caches).
        sample, t, ehs, kw = inputs(1)
        unet(sample, t, encoder_hidden_states=ehs, **kw)
        for batch in (1, 2):
            sample, t, ehs, kw = inputs(batch)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = unet(sample, t, encoder_hidden_states=ehs, **kw).sample
                times.append(time.perf_counter() - t0)
            assert out.shape == sample.shape[:1] + (unet.config.out_channels,) + sample.shape[2:]
            results[batch] = times

    load = os.getloadavg()
    print(f"config: {args.config}")
    print(f"params: {n_params}")
    print(f"latent {s}x{s}, context {L}x{cross_dim}, text_time={text_time}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()} (requested {args.threads})")
    for batch, times in results.items():
        print(f"diffusers forward, batch {batch}: {statistics.median(times):.4f} s"
              f"  (runs: {', '.join(f'{x:.4f}' for x in times)})")
    print(f"load average before run: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    if args.json:
        doc = {
            "config": os.path.abspath(args.config),
            "params": n_params,
            "latent_size": s,
            "context_len": L,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "batch1_median_s": statistics.median(results[1]),
            "batch2_median_s": statistics.median(results[2]),
            "batch1_runs_s": results[1],
            "batch2_runs_s": results[2],
            "loadavg_before": list(load_before),
            "loadavg_after": list(load),
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
