#!/usr/bin/env python3
"""Check models/default with diffusers' own StableDiffusionPipeline.

Loads the exported folder, draws samples (saved to docs/images/diffusers-*.png),
measures colour / shape statistics, guidance sensitivity and the rel-MAE curve
between conditional and unconditional noise predictions over a 50-step DDIM run.

    /work/venv/bin/python tools/verify_default_model.py [--model models/default]
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

import shapes_world as sw  # tools/ is on sys.path: run as a script or imported by the trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
PROMPTS = [
    "a red circle on a white background",
    "a blue circle on a white background",
    "a red square on a white background",
    "a red triangle on a white background",
    "a green triangle on a black background",
    "a yellow square on a gray background",
    "a purple circle at the left of a white background",
    "a blue square above a yellow triangle on a black background",
    "a red circle left of a green square on a white background",
]

# paper's SDXL thresholds for the cond/uncond convergence detector
TAU = dict(L=12, eps=0.4e-3, k=5, tau_cap=15)


def load(model_dir, threads):
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(pipe, prompt, seed, steps=20, cfg=5.0):
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, generator=g, output_type="np")
    return out.images[0]  # HxWx3 float in [0,1]


def colour_masks(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return {
        "red": (r > 0.55) & (g < 0.35) & (b < 0.35),
        "blue": (b > 0.55) & (r < 0.35) & (g < 0.5),
        "green": (g > 0.45) & (r < 0.35) & (b < 0.4),
    }


def drawn_mask(img, bg):
    """Pixels of an HxWx3 [0,1] image farther than 60/255 from the background colour."""
    return np.linalg.norm(img * 255.0 - np.array(bg, dtype=np.float64), axis=-1) > 60


def colour_confusion(img, palette, bg):
    """Share of the drawn pixels whose nearest palette colour is each palette entry;
    {} when nothing is drawn."""
    shape = drawn_mask(img, bg)
    if shape.sum() < 8:
        return {}
    names = list(palette)
    cols = np.array([palette[n] for n in names], dtype=np.float64)
    px = img[shape] * 255.0
    nearest = np.argmin(np.linalg.norm(px[:, None, :] - cols[None], axis=2), axis=1)
    return {n: float((nearest == i).mean()) for i, n in enumerate(names)}


def fill_ratio(mask):
    """Pixels of the mask / area of its bounding box (circle ~0.79, square ~1, triangle ~0.5)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 8:
        return float("nan")
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(len(ys) / area)


def tau1(values, L, eps, tau_cap, **_):
    """First step i (0-based) where slope = (v[n-L] - v[n-1]) / L, computed once
    the log holds more than L entries, satisfies 0 <= slope < eps; else tau_cap."""
    slopes = []
    for i in range(len(values)):
        n = i + 1
        if n > L:
            s = (values[n - L] - values[n - 1]) / L
            slopes.append((i, s))
            if 0 <= s < eps:
                return i, slopes
    return tau_cap, slopes


@torch.no_grad()
def relmae_curve(pipe, prompt, seed, steps=50, cfg=5.0):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    emb = torch.cat([uncond, cond])
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((1, 4, 16, 16), generator=g) * sched.init_noise_sigma
    curve = []
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([lat, lat]), t)
        eps = pipe.unet(x, t, encoder_hidden_states=emb).sample
        eu, ec = eps.chunk(2)
        curve.append(float((ec - eu).abs().mean() / eu.abs().mean()))
        lat = sched.step(eu + cfg * (ec - eu), t, lat).prev_sample
    img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    img = (img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return curve, img


def save_png(img, path, scale=4):
    im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def run(model_dir, images_dir, threads=2):
    pipe = load(model_dir, threads)
    os.makedirs(images_dir, exist_ok=True)
    res = {"prompts": {}}
    grid = []
    for p in PROMPTS:
        imgs = [gen(pipe, p, s) for s in SEEDS]
        grid.append(np.concatenate(imgs, axis=1))
        st = {
            "mean_rgb": np.mean([im.reshape(-1, 3).mean(0) for im in imgs], axis=0).round(4).tolist(),
        }
        for cname in ("red", "blue", "green"):
            ms = [colour_masks(im)[cname] for im in imgs]
            st[f"{cname}_frac"] = round(float(np.mean([m.mean() for m in ms])), 4)
            if cname == p.split()[1]:
                fr = [fill_ratio(m) for m in ms]
                st[f"{cname}_fill_ratio_per_seed"] = [round(f, 3) for f in fr]
                st[f"{cname}_fill_ratio"] = round(float(np.nanmean(fr)), 3)
        res["prompts"][p] = st
        print(p, json.dumps(st), flush=True)
        slug = p.replace("a ", "").replace(" ", "-")[:60]
        if p in PROMPTS[:4] or "above" in p:
            save_png(imgs[0], os.path.join(images_dir, f"diffusers-{slug}-seed0.png"))
    save_png(np.concatenate(grid, axis=0), os.path.join(images_dir, "diffusers-grid.png"), scale=2)

    # colour words: which palette colour the drawn circle's pixels are nearest to
    palette = {k: v for k, v in sw.COLORS.items() if k != "white"}
    res["colour_accuracy"] = {}
    for c in ("red", "green", "blue", "yellow", "purple", "orange"):
        shares = [colour_confusion(gen(pipe, f"a {c} circle on a white background", s), palette, (255, 255, 255))
                  for s in SEEDS[:4]]
        shares = [x for x in shares if x]
        mean = {k: round(float(np.mean([x[k] for x in shares])), 3) for k in palette} if shares else {}
        top = max(mean, key=mean.get) if mean else None
        res["colour_accuracy"][c] = dict(named=mean.get(c, 0.0), most=top, most_share=mean.get(top, 0.0),
                                         drawn=len(shares))
        print("colour", c, res["colour_accuracy"][c], flush=True)

    # shape words: how much of its bounding box the drawn (non-background) shape fills
    res["shape_fill"] = {}
    for shp in ("circle", "square", "triangle"):
        fr = []
        for c in ("red", "blue"):
            for s in SEEDS[:4]:
                img = gen(pipe, f"a {c} {shp} on a white background", s)
                fr.append(fill_ratio(drawn_mask(img, (255, 255, 255))))
        res["shape_fill"][shp] = round(float(np.nanmean(fr)), 3)
    print("shape fill", res["shape_fill"], flush=True)

    # guidance 1 vs 5
    p = PROMPTS[0]
    d = []
    for s in SEEDS[:4]:
        a, b = gen(pipe, p, s, cfg=1.0), gen(pipe, p, s, cfg=5.0)
        d.append(float(np.abs(a - b).mean()))
        if s == 0:
            save_png(a, os.path.join(images_dir, "diffusers-red-circle-cfg1-seed0.png"))
            res["cfg1_mean_rgb_seed0"] = a.reshape(-1, 3).mean(0).round(4).tolist()
            res["cfg1_red_frac_seed0"] = round(float(colour_masks(a)["red"].mean()), 4)
    res["cfg1_vs_cfg5_mean_abs_diff"] = [round(x, 4) for x in d]
    print("cfg1 vs cfg5 mean|diff|", d, flush=True)

    # rel-MAE curves (50-step DDIM, guidance 5)
    res["relmae"] = {}
    for p, s in (
        ("a red circle on a white background", 0),
        ("a blue circle on a white background", 0),
        ("a blue square above a yellow triangle on a black background", 0),
    ):
        curve, img = relmae_curve(pipe, p, s)
        i, slopes = tau1(curve, **TAU)
        res["relmae"][p] = {
            "seed": s,
            "curve": [round(v, 5) for v in curve],
            "slopes": [(j, round(v, 6)) for j, v in slopes],
            "tau1_paper_sdxl": i,
        }
        print("relmae", p, [round(v, 4) for v in curve], "tau1", i, flush=True)
        if p == "a red circle on a white background":
            ref = gen(pipe, p, s, steps=50)
            res["manual_loop_vs_pipeline_max_abs"] = float(np.abs(ref - img).max())
    with open(os.path.join(model_dir, "verify_stats.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models/default"))
    ap.add_argument("--images-dir", default=os.path.join(ROOT, "docs/images"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    run(a.model, a.images_dir, a.threads)
