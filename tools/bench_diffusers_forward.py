#!/usr/bin/env python3
"""Time diffusers' eager forward of a denoiser folder written by `hybridiff init`.

The baseline of tools/gpu-check.sh: loads DIR/unet (UNet2DConditionModel) or
DIR/transformer (SD3Transformer2DModel) with diffusers from the same safetensors
that `hybridiff bench --model DIR` reads, casts to --dtype, moves it to --device,
and times --repeats forwards (after one warm-up) at batch 1 and batch 2 on random
inputs of the shapes `hybridiff bench` uses (latents [b, C, N, N], --context-len
text tokens, pooled embeddings, SDXL time ids). On CUDA every timed forward ends
with torch.cuda.synchronize(); peak memory is torch.cuda.max_memory_allocated
per batch size (the caching allocator's tensors, not the CUDA context).

Prints one JSON object (and writes it to --json): median seconds per forward and
peak bytes for batch 1 and 2, with the versions of torch and diffusers. Exits 3
with a message when diffusers cannot be imported.

Example:
    python3 tools/bench_diffusers_forward.py --model /tmp/sdxl --latent-size 128 \
        --device cuda --dtype f16 --repeats 5 --json forward-diffusers-sdxl.json
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder holding unet/ or transformer/ (hybridiff init --out)")
    p.add_argument("--latent-size", type=int, required=True, help="latent height = width")
    p.add_argument("--context-len", type=int, default=77, help="text tokens (default 77; SD3 pipelines use 333)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size (median reported)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args()


def main():
    a = parse_args()
    if a.threads is not None:
        # Before torch is imported: OpenMP and MKL read these once.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    try:
        import torch
        import diffusers
    except ImportError as e:
        print(f"bench_diffusers_forward: diffusers is not importable ({e}); no baseline", file=sys.stderr)
        return 3
    if a.threads is not None:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)
    if a.repeats < 1:
        print("--repeats must be at least 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t_load = time.perf_counter()
    if os.path.isdir(os.path.join(a.model, "unet")):
        kind = "unet"
        model = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(a.model, "unet"), torch_dtype=dtype)
    elif os.path.isdir(os.path.join(a.model, "transformer")):
        kind = "transformer"
        model = diffusers.SD3Transformer2DModel.from_pretrained(
            os.path.join(a.model, "transformer"), torch_dtype=dtype
        )
    else:
        print(f"--model {a.model}: no unet/ or transformer/ folder", file=sys.stderr)
        return 2
    # Every parameter in --dtype (from_pretrained keeps some SD3 modules in f32).
    model = model.to(device=dev, dtype=dtype).eval()
    load_s = time.perf_counter() - t_load
    cfg = model.config
    n = a.latent_size

    def inputs(b):
        x = torch.randn(b, cfg.in_channels, n, n, device=dev, dtype=dtype)
        if kind == "unet":
            ctx = torch.randn(b, a.context_len, cfg.cross_attention_dim, device=dev, dtype=dtype)
            kw = {"encoder_hidden_states": ctx}
            if cfg.addition_embed_type == "text_time":
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(b, pooled, device=dev, dtype=dtype),
                    "time_ids": torch.tensor([[8.0 * n, 8.0 * n, 0, 0, 8.0 * n, 8.0 * n]] * b, device=dev, dtype=dtype),
                }
            return lambda: model(x, 500, **kw)
        ctx = torch.randn(b, a.context_len, cfg.joint_attention_dim, device=dev, dtype=dtype)
        pooled = torch.randn(b, cfg.pooled_projection_dim, device=dev, dtype=dtype)
        t = torch.full((b,), 500.0, device=dev, dtype=dtype)
        return lambda: model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    out = {
        "model": a.model,
        "kind": kind,
        "latent_size": n,
        "context_len": a.context_len,
        "device": str(dev),
        "dtype": a.dtype,
        "repeats": a.repeats,
        "threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "forward_seconds": {},
        "peak_bytes": {},
    }
    with torch.inference_mode():
        for b in (1, 2):
            f = inputs(b)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            f()
            sync()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                f()
                sync()
                times.append(time.perf_counter() - t0)
            out["forward_seconds"][f"batch{b}"] = statistics.median(times)
            out["peak_bytes"][f"batch{b}"] = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
