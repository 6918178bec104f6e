#!/usr/bin/env python3
"""How often the embedded default model draws the colour a prompt names (issue 17).

Runs `hybridiff generate` (no --model: the embedded default model, exactly what a new user
gets) on a fixed table of prompts x seeds in one `--prompts` batch, and scores each image:

- background: the median colour of the image's 1-pixel border (the prompt may not name it);
- drawn pixels: farther than 60/255 (Euclidean, RGB) from that background;
- colour hit (one-shape prompts): the named colour is the most frequent nearest palette
  colour (tools/shapes_world.py COLORS) among the drawn pixels;
- pair hit (two-shape prompts): the two named colours are the two most frequent;
- fill ratio per shape word (drawn pixels / their bounding box; circle 0.78, square 1.0,
  triangle 0.52 in the training data) on the one-shape prompts.

Prints the hit rates by phrasing and writes them as JSON.

    python tools/colour_hit_rate.py [--bin target/release/hybridiff] [--json out.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import shapes_world as sw  # noqa: E402

SEEDS = (1, 2, 7)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
# phrasing name -> template over colour c and shape s ("an" before vowels where it says {a})
ONE_SHAPE = {
    "grammar": "a {c} {s} on a {bg} background",
    "short": "{a} {c} {s}",
    "no article": "{c} {s}",
    "capitals, full stop": "{A} {C} {S}.",
    "shape, colour": "a {s}, {c}",
    "no background, positioned": "{a} {c} {s} at the left",
}
BACKGROUND_FOR = {"red": "white", "green": "black", "blue": "white", "yellow": "gray", "purple": "white",
                  "orange": "black"}
SYNONYM = {"disc": ("circle", "a {c} disc"), "box": ("square", "a {c} box"), "ball": ("circle", "a {c} ball")}
TWO_SHAPES = {
    "grammar": "a {c} {s} above a {c2} {s2} on a {bg} background",
    "short": "a {c} {s} above a {c2} {s2}",
}
PAIRS = [("red", "circle", "blue", "square"), ("yellow", "triangle", "purple", "circle"),
         ("green", "square", "orange", "triangle"), ("blue", "circle", "red", "triangle")]


def table():
    rows = []
    for name, t in ONE_SHAPE.items():
        for c in COLOURS:
            for s in SHAPES:
                a = "an" if c[0] in "aeiou" else "a"
                p = t.format(a=a, A=a.capitalize(), c=c, C=c.capitalize(), s=s, S=s.capitalize(),
                             bg=BACKGROUND_FOR[c])
                rows.append(dict(kind="one", phrasing=name, prompt=p, colours=[c], shape=s))
    for name, (s, t) in SYNONYM.items():
        for c in COLOURS:
            rows.append(dict(kind="one", phrasing="synonym " + name, prompt=t.format(c=c), colours=[c], shape=s))
    for name, t in TWO_SHAPES.items():
        for c, s, c2, s2 in PAIRS:
            bg = next(b for b in ("white", "gray", "black") if b not in (c, c2))
            rows.append(dict(kind="two", phrasing="two shapes " + name,
                             prompt=t.format(c=c, s=s, c2=c2, s2=s2, bg=bg), colours=[c, c2], shape=None))
    return rows


def score(img):
    """(colour shares by palette name, fill ratio or None) of an HxWx3 uint8 image."""
    px = img.astype(np.float64)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    drawn = np.linalg.norm(px - bg, axis=-1) > 60
    if drawn.sum() < 8:
        return {}, None
    names = list(sw.COLORS)
    pal = np.array([sw.COLORS[n] for n in names], dtype=np.float64)
    nearest = np.argmin(np.linalg.norm(px[drawn][:, None, :] - pal[None], axis=2), axis=1)
    shares = {n: float((nearest == i).mean()) for i, n in enumerate(names)}
    ys, xs = np.nonzero(drawn)
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return shares, float(fill)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/hybridiff"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--model", help="a model folder instead of the embedded default model")
    a = ap.parse_args()
    rows = table()
    tmp = tempfile.mkdtemp(prefix="hybridiff-hits-")
    batch = os.path.join(tmp, "batch.json")
    items = [dict(prompt=r["prompt"], seed=s) for r in rows for s in SEEDS]
    with open(batch, "w") as f:
        json.dump(items, f)
    out = os.path.join(tmp, "out")
    cmd = [a.bin, "generate", "--prompts", batch, "--out", out] + (["--model", a.model] if a.model else [])
    try:
        p = subprocess.run(cmd, env={**os.environ, "HYBRIDIFF_CACHE": os.path.join(tmp, "cache")},
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
        imgs = [np.asarray(Image.open(os.path.join(out, f"{i:04}.png")).convert("RGB")) for i in range(len(items))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~400 PNGs and the unpacked model
    by_phrasing, fills, misses = {}, {s: [] for s in SHAPES}, []
    i = 0
    for r in rows:
        for seed in SEEDS:
            img = imgs[i]
            i += 1
            shares, fill = score(img)
            top = sorted(shares, key=shares.get, reverse=True)
            want = r["colours"]
            hit = bool(shares) and set(top[: len(want)]) == set(want)
            by_phrasing.setdefault(r["phrasing"], []).append(hit)
            if not hit:
                misses.append(dict(prompt=r["prompt"], seed=seed, top=top[:2]))
            if r["kind"] == "one" and fill is not None and r["shape"] in fills:
                fills[r["shape"]].append(fill)
    rates = {k: sum(v) / len(v) for k, v in by_phrasing.items()}
    one = [h for k, v in by_phrasing.items() if not k.startswith("two") for h in v]
    res = dict(
        seeds=list(SEEDS),
        images=len(items),
        hit_rate_one_shape=sum(one) / len(one),
        hit_rate_by_phrasing=rates,
        mean_fill_ratio={s: (float(np.mean(v)) if v else None) for s, v in fills.items()},
        misses=misses,
    )
    for k, v in rates.items():
        print(f"{k:28s} {v * 100:5.1f}%  ({sum(by_phrasing[k])}/{len(by_phrasing[k])})")
    print(f"{'all one-shape prompts':28s} {res['hit_rate_one_shape'] * 100:5.1f}%")
    print("mean fill ratio:", ", ".join(f"{s} {v:.3f}" for s, v in res["mean_fill_ratio"].items() if v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
