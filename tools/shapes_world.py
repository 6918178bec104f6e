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
    """One (image uint8 HxWx3, canonical caption) pair (see `sample_scene`)."""
    img, scene = sample_scene(rng, p_two, p_unpositioned)
    return img, canonical(scene)


def sample_scene(rng, p_two=0.35, p_unpositioned=0.4):
    """One (image uint8 HxWx3, scene) pair; `canonical(scene)` is the grammar's caption and
    `phrase(rng, scene)` one of the ways a person would type it."""
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
            scene = dict(kind="one", col=col, shape=shape, pos=None, bg=bg)
        else:
            pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
            px, py, _ = POSITIONS[pos]
            cx, cy = px + rng.uniform(-3, 3), py + rng.uniform(-3, 3)
            r = min(r, 13.0) if pos != "center" else r
            scene = dict(kind="one", col=col, shape=shape, pos=pos, bg=bg)
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
        scene = dict(kind="two", col=c1, shape=s1, rel=rel, col2=c2, shape2=s2, bg=bg)
    for shape, col, cx, cy, r in items:
        m = shape_mask(shape, cx, cy, r)[..., None]
        img = img * (1 - m) + np.asarray(COLORS[col], np.float32) * m
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), scene


def batch(rng, n, **kw):
    """n images and their canonical captions."""
    imgs, caps = zip(*(sample(rng, **kw) for _ in range(n)))
    return np.stack(imgs), list(caps)


def batch_scenes(rng, n, **kw):
    """n images and their scenes (for `phrase`)."""
    imgs, scenes = zip(*(sample_scene(rng, **kw) for _ in range(n)))
    return np.stack(imgs), list(scenes)


def canonical(scene):
    """The fixed grammar every caption followed up to the 2026-11 retrain (MODEL_CARD.md)."""
    if scene["kind"] == "one":
        if scene["pos"] is None:
            return f"a {scene['col']} {scene['shape']} on a {scene['bg']} background"
        return f"a {scene['col']} {scene['shape']} {POSITIONS[scene['pos']][2]} a {scene['bg']} background"
    return (f"a {scene['col']} {scene['shape']} {scene['rel']} a {scene['col2']} {scene['shape2']} "
            f"on a {scene['bg']} background")


# What people type instead of the grammar (issue 17: "a blue circle" drew green because no
# caption ever lacked the background phrase). A synonym replaces the grammar's noun in
# P_SYNONYM of the free phrasings only: the 2026-11-30 one-stage trial, where 4 of 7 circle
# words were synonyms, drew "circle" and "square" as the same rounded square (training in
# two stages, train_default_model.py, is the other half of the fix). Upper and title case
# are lowercased by CLIP's tokenizer: they cost nothing and keep the recipe honest if the
# tokenizer changes.
P_SYNONYM = 0.15
SYNONYMS = {
    "circle": ("disc", "disk", "ball", "dot"),
    "square": ("box", "block"),
    "triangle": (),
}
RELATION_WORDS = {
    "above": ("above", "above", "over", "on top of"),
    "below": ("below", "below", "under", "beneath"),
    "left of": ("left of", "left of", "to the left of", "on the left of"),
    "right of": ("right of", "right of", "to the right of", "on the right of"),
}
POSITION_WORDS = {  # without the background phrase
    "left": ("at the left", "on the left", "on the left side", "left"),
    "right": ("at the right", "on the right", "on the right side", "right"),
    "top": ("at the top", "on top", "at the top of the image", "top"),
    "bottom": ("at the bottom", "at the bottom of the image", "bottom"),
    "center": ("in the center", "in the middle", "centered", "center"),
}


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def _article(rng, word):
    u = rng.random()
    if u < 0.55:
        return ("an " if word[0] in "aeiou" else "a ") if rng.random() < 0.8 else "a "
    if u < 0.65:
        return "one "
    if u < 0.72:
        return "the "
    return ""


def _object(rng, col, shape, plain=False):
    noun = shape
    if SYNONYMS[shape] and rng.random() < P_SYNONYM:
        noun = _pick(rng, SYNONYMS[shape])
    u = rng.random()
    if u < 0.75 or plain:
        return _article(rng, col) + f"{col} {noun}"
    if u < 0.88:
        return _article(rng, noun) + f"{noun}, {col}"
    return _article(rng, noun) + f"{noun} that is {col}"


def _background(rng, bg):
    return _pick(rng, (f" on a {bg} background", f" on a {bg} background", f" on {bg}",
                       f" with a {bg} background", f" against a {bg} background", f", {bg} background"))


def phrase(rng, scene, p_canonical=0.5, p_no_background=0.4):
    """One caption for `scene`: the canonical grammar with probability p_canonical, else a
    free phrasing (article or none, synonyms, "shape, colour" order, background phrase
    left out with probability p_no_background, capitals, a trailing full stop)."""
    if rng.random() < p_canonical:
        text = canonical(scene)
    else:
        no_bg = rng.random() < p_no_background
        two = scene["kind"] == "two"  # "shape, colour" orders are kept to one-shape captions
        obj = _object(rng, scene["col"], scene["shape"], plain=two)
        if scene["kind"] == "one":
            if scene["pos"] is None:
                text = obj + ("" if no_bg else _background(rng, scene["bg"]))
            elif no_bg:
                text = f"{obj} {_pick(rng, POSITION_WORDS[scene['pos']])}"
            else:
                text = f"{obj} {POSITIONS[scene['pos']][2]} a {scene['bg']} background"
        else:
            obj2 = _object(rng, scene["col2"], scene["shape2"], plain=True)
            if rng.random() < 0.15:  # no relation named: only which two shapes
                text = f"{obj} and {obj2}"
            else:
                text = f"{obj} {_pick(rng, RELATION_WORDS[scene['rel']])} {obj2}"
            text += "" if no_bg else _background(rng, scene["bg"])
    u = rng.random()
    if u < 0.25:
        text = text[0].upper() + text[1:]
    elif u < 0.3:
        text = text.upper()
    elif u < 0.35:
        text = text.title()
    if rng.random() < 0.25:
        text += "."
    return text
