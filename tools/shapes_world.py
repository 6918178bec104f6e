"""Procedural "shapes world" used to train hybridiff's embedded default model.

64x64 RGB images of one or two flat shapes (circle, square, triangle) in a few
colours on a plain background, with an English caption. Everything is drawn
from a `numpy.random.Generator`, so a seed fixes the data exactly.
"""

import numpy as np

SIZE = 64
SS = 2  # supersampling factor for anti-aliased edges

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")

# single-shape positions: name -> (cx, cy, caption phrase)
POSITIONS = {
    "left": (17.0, 32.0, "at the left of"),
    "right": (47.0, 32.0, "at the right of"),
    "top": (32.0, 17.0, "at the top of"),
    "bottom": (32.0, 47.0, "at the bottom of"),
    "center": (32.0, 32.0, "in the center of"),
}
RELATIONS = ("above", "below", "left of", "right of")

_c = (np.arange(SIZE * SS, dtype=np.float32) + 0.5) / SS
_YY, _XX = np.meshgrid(_c, _c, indexing="ij")


def shape_mask(shape, cx, cy, r):
    """Anti-aliased coverage mask (64x64 float in [0,1]) of a shape of half-size r."""
    x, y = _XX, _YY
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.9  # equal-ish area to the circle
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        top, base = cy - r * 1.05, cy + r * 0.95
        hw = r * 1.1  # half-width of the base
        m = (y <= base) & (y >= top) & (np.abs(x - cx) <= (y - top) / (base - top) * hw)
    else:
        raise ValueError(shape)
    m = m.astype(np.float32).reshape(SIZE, SS, SIZE, SS).mean(axis=(1, 3))
    return m


def _pick_color(rng, exclude):
    names = [c for c in COLORS if c not in exclude]
    return names[rng.integers(len(names))]


def sample(rng, p_two=0.35, p_unpositioned=0.4):
    """One (image uint8 HxWx3, caption) pair."""
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[bg]
    items = []  # (shape, colour, cx, cy, r)
    if rng.random() >= p_two:
        shape = SHAPES[rng.integers(3)]
        col = _pick_color(rng, {bg})
        r = rng.uniform(9.0, 14.0)
        if rng.random() < p_unpositioned:
            cx, cy = 32 + rng.uniform(-5, 5), 32 + rng.uniform(-5, 5)
            cap = f"a {col} {shape} on a {bg} background"
        else:
            pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
            px, py, phrase = POSITIONS[pos]
            cx, cy = px + rng.uniform(-3, 3), py + rng.uniform(-3, 3)
            r = min(r, 13.0) if pos != "center" else r
            cap = f"a {col} {shape} {phrase} a {bg} background"
        items.append((shape, col, cx, cy, r))
    else:
        s1, s2 = SHAPES[rng.integers(3)], SHAPES[rng.integers(3)]
        c1 = _pick_color(rng, {bg})
        c2 = _pick_color(rng, {bg, c1})
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        r1, r2 = rng.uniform(7.0, 10.0), rng.uniform(7.0, 10.0)
        a = 32 + rng.uniform(-6, 6)  # shared coordinate
        b1, b2 = 17 + rng.uniform(-2, 2), 47 + rng.uniform(-2, 2)
        if rel in ("above", "left of"):
            p1, p2 = b1, b2  # shape 1 first (top / left)
        else:
            p1, p2 = b2, b1
        if rel in ("above", "below"):
            xy1, xy2 = (a, p1), (a + rng.uniform(-3, 3), p2)
        else:
            xy1, xy2 = (p1, a), (p2, a + rng.uniform(-3, 3))
        items.append((s1, c1, xy1[0], xy1[1], r1))
        items.append((s2, c2, xy2[0], xy2[1], r2))
        cap = f"a {c1} {s1} {rel} a {c2} {s2} on a {bg} background"
    for shape, col, cx, cy, r in items:
        m = shape_mask(shape, cx, cy, r)[..., None]
        img = img * (1 - m) + np.asarray(COLORS[col], np.float32) * m
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cap


def batch(rng, n, **kw):
    imgs, caps = zip(*(sample(rng, **kw) for _ in range(n)))
    return np.stack(imgs), list(caps)
