#!/usr/bin/env python3
"""The README's sampler table: every sampler on the embedded default model, ours against
diffusers' from the same seed.

For each sampler (same prompt, seed, 20 steps, guidance 5): runs the release binary
(`hybridiff generate`, no `--model`: what a new user gets) with `--noise torch` `--repeats`
times and keeps the median wall time of the process and of the denoising (the trace's
`total_seconds`); then diffusers' StableDiffusionPipeline on models/default with that
sampler's class (`from_config` of the folder's scheduler config plus the same options) and
`generator=torch.Generator("cpu").manual_seed(seed)`: diffusers draws the starting latents
and every stochastic step's noise from that generator, and `--noise torch` replays the same
draws, so the two images are comparable pixel for pixel with nothing injected. Finally
`hybridiff compare` gives PSNR and SSIM between the two folders.

Writes docs/images/samplers.png (top row ours, bottom row diffusers, 4x nearest-neighbour
upscale, one column per sampler in the table's order) and docs/images/samplers.json, and
prints the Markdown table. `--ours-only` (no torch or diffusers needed, only Pillow) runs
our side alone (default noise): one row of images, the table without diffusers' columns.
Timings are only comparable within one run; note the load average it prints.

    cargo build --release -p hybridiff-cli
    /work/venv/bin/python tools/sampler_demo.py [--bin target/release/hybridiff] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from PIL import Image

# torch, diffusers and safetensors are imported where used, so that --ours-only runs
# without them.

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROMPT = "a red circle on a white background"
SEED = 1
STEPS = 20
GUIDANCE = 5.0

# (label, our flags, diffusers class, from_config overrides, pipeline kwargs)
SAMPLERS = [
    ("ddim (model's)", [], "DDIMScheduler", {}, {}),
    ("euler", ["--scheduler", "euler"], "EulerDiscreteScheduler", {}, {}),
    ("euler --karras", ["--scheduler", "euler", "--karras"], "EulerDiscreteScheduler",
     {"use_karras_sigmas": True}, {}),
    ("euler-a", ["--scheduler", "euler-a"], "EulerAncestralDiscreteScheduler", {}, {}),
    ("dpmpp-2m", ["--scheduler", "dpmpp-2m"], "DPMSolverMultistepScheduler", {}, {}),
    ("dpmpp-2m --karras", ["--scheduler", "dpmpp-2m", "--karras"], "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True}, {}),
    ("dpmpp-2m-sde --karras", ["--scheduler", "dpmpp-2m-sde", "--karras"], "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}, {}),
    ("unipc", ["--scheduler", "unipc"], "UniPCMultistepScheduler", {}, {}),
    ("lcm", ["--scheduler", "lcm"], "LCMScheduler", {}, {}),
    ("dpmpp-2m --karras --guidance-rescale 0.7",
     ["--scheduler", "dpmpp-2m", "--karras", "--guidance-rescale", "0.7"], "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True}, {"guidance_rescale": 0.7}),
]


def file_name(label):
    return "".join(c if c.isalnum() else "_" for c in label).strip("_") + ".png"


def ours(binary, cache, out_dir, label, flags, repeats):
    png = os.path.join(out_dir, file_name(label))
    walls, denoise = [], []
    for _ in range(repeats):
        trace = os.path.join(out_dir, "trace.json")
        args = [binary, "generate", "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
                "--guidance", str(GUIDANCE), "--out", png, "--trace", trace, *flags]
        t = time.perf_counter()
        p = subprocess.run(args, env={**os.environ, "HYBRIDIFF_CACHE": cache}, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr}")
        with open(trace) as f:
            denoise.append(json.load(f)["total_seconds"])
    return png, statistics.median(walls), statistics.median(denoise)


def diffusers_image(pipe, cls_name, overrides, kwargs, out_png):
    import diffusers
    import torch

    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.base_scheduler_config, **overrides)
    generator = torch.Generator("cpu").manual_seed(SEED)
    t = time.perf_counter()
    img = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator,
               output_type="pil", **kwargs).images[0]
    seconds = time.perf_counter() - t
    img.save(out_png)
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "hybridiff"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for diffusers")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images"))
    ap.add_argument("--ours-only", action="store_true", help="our images and times alone (no diffusers)")
    args = ap.parse_args()
    if args.ours_only:
        return ours_only(args)

    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    print("load average before:", os.getloadavg())
    work = tempfile.mkdtemp()
    cache = os.path.join(work, "cache")
    ours_dir, theirs_dir = os.path.join(work, "ours"), os.path.join(work, "diffusers")
    os.makedirs(ours_dir)
    os.makedirs(theirs_dir)

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "models", "default"),
                                                   torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.base_scheduler_config = pipe.scheduler.config

    rows = []
    for label, flags, cls_name, overrides, kwargs in SAMPLERS:
        png, wall, denoise = ours(args.bin, cache, ours_dir, label, [*flags, "--noise", "torch"], args.repeats)
        theirs_png = os.path.join(theirs_dir, file_name(label))
        diffusers_image(pipe, cls_name, overrides, kwargs, theirs_png)  # warm-up
        d_seconds = statistics.median(
            diffusers_image(pipe, cls_name, overrides, kwargs, theirs_png) for _ in range(args.repeats))
        rows.append(dict(label=label, flags=" ".join(flags), diffusers=cls_name, overrides=overrides,
                         pipeline_kwargs=kwargs, file=file_name(label), wall_seconds=wall,
                         denoise_seconds=denoise, diffusers_seconds=d_seconds))
        print(f"{label}: ours {wall:.2f} s process / {denoise:.3f} s denoising, diffusers {d_seconds:.3f} s",
              flush=True)

    p = subprocess.run([args.bin, "compare", ours_dir, theirs_dir, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"hybridiff compare failed:\n{p.stderr}")
    cmp = json.loads(p.stdout)
    by_file = {e["file"]: e for e in cmp["images"]}
    for r in rows:
        e = by_file[r["file"]]
        r["psnr_db"], r["ssim"] = e["psnr_db"], e["ssim"]

    # Strip: ours on top, diffusers below, 4x nearest.
    ims = [(Image.open(os.path.join(ours_dir, r["file"])), Image.open(os.path.join(theirs_dir, r["file"])))
           for r in rows]
    w, h = ims[0][0].size
    strip = Image.new("RGB", (w * len(ims), 2 * h), "white")
    for i, (a, b) in enumerate(ims):
        strip.paste(a, (i * w, 0))
        strip.paste(b, (i * w, h))
    strip = strip.resize((strip.width * 4, strip.height * 4), Image.NEAREST)
    os.makedirs(args.out, exist_ok=True)
    strip.save(os.path.join(args.out, "samplers.png"))
    meta = dict(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=GUIDANCE, repeats=args.repeats,
                torch_threads=args.threads, load_average_after=os.getloadavg(), compare=cmp, rows=rows)
    with open(os.path.join(args.out, "samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    print("\nload average after:", os.getloadavg())
    print("\n| # | sampler (flags) | diffusers class | ours: process / denoising (s) | diffusers (s) | PSNR vs diffusers (dB) | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        psnr = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        ssim = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
        print(f"| {i + 1} | `{r['label']}` | {r['diffusers']} | {r['wall_seconds']:.2f} / {r['denoise_seconds']:.3f} "
              f"| {r['diffusers_seconds']:.3f} | {psnr} | {ssim} |")


def ours_only(args):
    """Our side of the table: each sampler's image (one row, 4x nearest) and times."""
    print("load average before:", os.getloadavg())
    work = tempfile.mkdtemp()
    cache = os.path.join(work, "cache")
    ours_dir = os.path.join(work, "ours")
    os.makedirs(ours_dir)
    rows = []
    for label, flags, cls_name, _, _ in SAMPLERS:
        _, wall, denoise = ours(args.bin, cache, ours_dir, label, flags, args.repeats)
        rows.append(dict(label=label, flags=" ".join(flags), diffusers=cls_name, file=file_name(label),
                         wall_seconds=wall, denoise_seconds=denoise))
        print(f"{label}: {wall:.2f} s process / {denoise:.3f} s denoising", flush=True)
    load_after = os.getloadavg()
    ims = [Image.open(os.path.join(ours_dir, r["file"])) for r in rows]
    w, h = ims[0].size
    strip = Image.new("RGB", (w * len(ims), h), "white")
    for i, a in enumerate(ims):
        strip.paste(a, (i * w, 0))
    strip = strip.resize((strip.width * 4, strip.height * 4), Image.NEAREST)
    os.makedirs(args.out, exist_ok=True)
    strip.save(os.path.join(args.out, "samplers.png"))
    meta = dict(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=GUIDANCE, repeats=args.repeats,
                ours_only=True, load_average_after=load_after, rows=rows)
    with open(os.path.join(args.out, "samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("\nload average after:", load_after)
    print("\n| # | sampler (flags) | diffusers class | process / denoising (s) |")
    print("| --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | `{r['label']}` | {r['diffusers']} | {r['wall_seconds']:.2f} / {r['denoise_seconds']:.3f} |")


if __name__ == "__main__":
    main()
