"""Procedural captioned-shapes dataset for kiln's tiny embedded model.

Every image is 64x64 RGB: ONE shape (circle, square, triangle or 5-pointed star) of one palette color on a plain
background of another palette color, at one of five positions and one of two sizes. Captions come from several
templates with varied word order; all state the shape color, the shape and the background color, and some also state
the size and/or the position (`Labels.stated` records which).

A fixed ~10% of the (color, shape, background) combinations is held out of training (`held_out_combos`) so that a
model trained on split "train" can be evaluated on combinations it never saw (`heldout_prompts`, split "heldout").

Geometry (all in 64-px image units; the shape's *bounding box* is what is placed and sized):
  * size "small" = 18 px across, "large" = 30 px across (the bounding box's larger side), jitter +-2 px;
  * position = bounding-box center at (32, 32) for "center", or 12 px from it towards the named side, jitter +-2 px
    per axis; the largest shape at the most extreme jitter still keeps a 2 px margin to the image edge.
  * colors are the palette's exactly, unless `color_jitter` asks for a spread around each (training data does).
Shapes are upright (square axis-aligned, triangle and star pointing up) and drawn at 4x then box-downsampled.

numpy + PIL only; deterministic for a given seed (numpy's PCG64 streams) and independent of global random state.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
SIZES: tuple[str, ...] = ("small", "large")

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "background", "position", "size")
ALL_STATED: frozenset[str] = frozenset(ATTRIBUTES)

SIZE_PX: dict[str, float] = {"small": 18.0, "large": 30.0}
POSITION_OFFSET = 12.0  # px from the image center for left/right/top/bottom
POSITION_DELTA: dict[str, tuple[float, float]] = {  # (dx, dy) direction, y grows downwards
    "center": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
}
POSITION_JITTER = 2.0  # px, uniform per axis
SIZE_JITTER = 2.0  # px, uniform
STAR_INNER_RATIO = 0.45  # inner / outer radius (0.382 is the classic pentagram; a bit fatter reads better when small)
SUPERSAMPLE = 4

HELD_OUT_COUNT = 22  # ~10% of the 8 * 4 * 7 = 224 valid combinations


@dataclass(frozen=True)
class Labels:
    """Ground truth of one image. `stated` (not part of equality or hashing) names the attributes its caption states;
    it defaults to all five."""

    color: str
    shape: str
    background: str
    position: str
    size: str
    stated: frozenset[str] = field(default=ALL_STATED, compare=False)

    def __post_init__(self):
        if self.color not in COLORS or self.background not in COLORS:
            raise ValueError(f"unknown color in {self}")
        if self.color == self.background:
            raise ValueError(f"shape color equals background color in {self}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if not set(self.stated) <= set(ATTRIBUTES):
            raise ValueError(f"unknown attributes in stated={set(self.stated)}")

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.background)


# ----------------------------------------------------------------------------------------------------------- drawing
def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of `shape` scaled so its bounding box's larger side is 1 and centered at the origin."""
    if shape == "square":
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif shape == "triangle":
        h = math.sqrt(3) / 2
        pts = [(0.0, -h / 2), (0.5, h / 2), (-0.5, h / 2)]
    elif shape == "star":
        outer = 1.0
        pts = []
        for k in range(10):
            r = outer if k % 2 == 0 else outer * STAR_INNER_RATIO
            a = math.radians(-90 + 36 * k)
            pts.append((r * math.cos(a), r * math.sin(a)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        scale = max(max(xs) - min(xs), max(ys) - min(ys))
        cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        pts = [((x - cx) / scale, (y - cy) / scale) for x, y in pts]
    else:
        raise ValueError(shape)
    return pts


_POLYGONS = {s: _unit_polygon(s) for s in ("square", "triangle", "star")}


def geometry(labels: Labels, rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """(cx, cy, size) in image pixels of the shape's bounding box; `rng` adds the bounded jitter."""
    dx, dy = POSITION_DELTA[labels.position]
    cx = IMAGE_SIZE / 2 + dx * POSITION_OFFSET
    cy = IMAGE_SIZE / 2 + dy * POSITION_OFFSET
    s = SIZE_PX[labels.size]
    if rng is not None:
        jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        cx, cy = cx + float(jx), cy + float(jy)
        s = s + float(rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return cx, cy, s


def _nearest_palette_distance() -> dict[str, float]:
    rgb = {name: np.array(c, dtype=np.float64) for name, c in COLORS.items()}
    return {n: min(float(np.linalg.norm(rgb[n] - rgb[o])) for o in rgb if o != n) for n in rgb}


# RGB distance from each palette color to its nearest other one (yellow-orange 76.3 is the closest pair).
PALETTE_GAP: dict[str, float] = _nearest_palette_distance()


def jittered_color(name: str, amount: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """COLORS[name] moved to a uniform point of the RGB ball of radius `amount` × PALETTE_GAP[name], clipped to
    [0, 255]. Below 0.5 every jittered color stays nearest its own palette entry, so the labels stay true."""
    v = rng.normal(size=3)
    v *= amount * PALETTE_GAP[name] * rng.uniform() ** (1 / 3) / np.linalg.norm(v)
    return tuple(int(x) for x in np.clip(np.round(np.array(COLORS[name], dtype=np.float64) + v), 0, 255))


def render(labels: Labels, rng: np.random.Generator | None = None, color_jitter: float = 0.0) -> np.ndarray:
    """The [64, 64, 3] uint8 image of `labels`; `rng` adds position/size jitter, None renders the canonical image.
    With `rng` and `color_jitter` > 0 the two colors are also jittered (`jittered_color`): named colors then cover a
    range, as real ones do, which keeps a guided sampler's ODE from being steep (docs/demo-model.md)."""
    fill, back = COLORS[labels.color], COLORS[labels.background]
    if rng is not None and color_jitter > 0:
        fill = jittered_color(labels.color, color_jitter, rng)
        back = jittered_color(labels.background, color_jitter, rng)
    cx, cy, s = geometry(labels, rng)
    k = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), back)
    draw = ImageDraw.Draw(big)
    # PIL pixel (i, j) covers [i, i+1) x [j, j+1); continuous coordinate u maps to u*k - 0.5 in PIL's center convention.
    if labels.shape == "circle":
        r = s / 2 * k
        x0, y0 = cx * k - r, cy * k - r
        draw.ellipse([x0, y0, x0 + 2 * r - 1, y0 + 2 * r - 1], fill=fill)
    else:
        pts = [((cx + s * x) * k - 0.5, (cy + s * y) * k - 0.5) for x, y in _POLYGONS[labels.shape]]
        draw.polygon(pts, fill=fill)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------------- captions
_WHERE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

# (template, attributes it states beyond color/shape/background)
TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = (
    ("a {color} {shape} on a {bg} background", frozenset()),
    ("a {size} {color} {shape} on a {bg} background", frozenset({"size"})),
    ("a {color} {shape} {where} on a {bg} background", frozenset({"position"})),
    ("a {size} {color} {shape} {where}, {bg} background", frozenset({"size", "position"})),
    ("{bg} background with a {size} {color} {shape} {where}", frozenset({"size", "position"})),
    ("on a {bg} background, a {color} {shape}", frozenset()),
    ("{where}: a {size} {color} {shape} on {bg}", frozenset({"size", "position"})),
    ("a picture of a {color} {shape}, {size}, {where}, on plain {bg}", frozenset({"size", "position"})),
    ("a {bg} image with a {color} {shape} {where}", frozenset({"position"})),
)
_BASE_STATED = frozenset({"color", "shape", "background"})
FULL_TEMPLATE = "a {size} {color} {shape} {where} on a {bg} background"


def _fill(template: str, labels: Labels) -> str:
    text = template.format(color=labels.color, shape=labels.shape, bg=labels.background,
                           size=labels.size, where=_WHERE[labels.position])
    return re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def caption_with_stated(labels: Labels, rng: np.random.Generator) -> tuple[str, frozenset[str]]:
    """A caption from a random template, and the attributes it states."""
    template, extra = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return _fill(template, labels), _BASE_STATED | extra


def caption(labels: Labels, rng: np.random.Generator) -> str:
    """A caption of `labels` from a random template (always states color, shape and background)."""
    return caption_with_stated(labels, rng)[0]


def caption_stating(labels: Labels, rng: np.random.Generator) -> str:
    """A caption from a random template among those stating exactly `labels.stated`."""
    fits = [t for t, extra in TEMPLATES if _BASE_STATED | extra == labels.stated]
    if not fits:
        raise ValueError(f"no template states exactly {sorted(labels.stated)}")
    return _fill(fits[int(rng.integers(len(fits)))], labels)


_CHOICES = {"color": tuple(COLORS), "background": tuple(COLORS), "shape": SHAPES, "position": POSITIONS,
            "size": SIZES}


def mislabel(labels: Labels, p: float | dict[str, float], rng: np.random.Generator) -> Labels:
    """`labels` with each stated attribute, with probability `p` (one for all, or per attribute name), replaced by
    another valid value (a shape color never equal to the background). Web captions are often wrong like this;
    training on such captions is what makes a model need classifier-free guidance."""
    values = {a: getattr(labels, a) for a in ATTRIBUTES}
    for attr in ATTRIBUTES:  # fixed order: the same rng state gives the same result
        if attr in labels.stated and rng.random() < (p[attr] if isinstance(p, dict) else p):
            taken = {values[attr]}
            if attr in ("color", "background"):  # the shape must stay visible on its background
                taken.add(values["background" if attr == "color" else "color"])
            options = [v for v in _CHOICES[attr] if v not in taken]
            values[attr] = options[int(rng.integers(len(options)))]
    return Labels(**values, stated=labels.stated)


# ------------------------------------------------------------------------------------------------------------ splits
def all_combos() -> list[tuple[str, str, str]]:
    """Every valid (color, shape, background), in a fixed order."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def _held_out() -> frozenset[tuple[str, str, str]]:
    # Rank by a content hash (stable across numpy/Python versions), then take combos greedily under per-attribute
    # caps, so the held-out set is spread over colors, shapes and backgrounds.
    ranked = sorted(all_combos(), key=lambda t: hashlib.sha256("|".join(t).encode()).hexdigest())
    caps = {"color": 3, "shape": 6, "background": 3}
    counts: dict[tuple[str, str], int] = {}
    chosen = []
    for c, s, b in ranked:
        keys = [("color", c), ("shape", s), ("background", b)]
        if all(counts.get(key, 0) < caps[key[0]] for key in keys):
            chosen.append((c, s, b))
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
            if len(chosen) == HELD_OUT_COUNT:
                break
    held = frozenset(chosen)
    train = [t for t in all_combos() if t not in held]
    assert len(held) == HELD_OUT_COUNT
    assert {t[0] for t in train} == set(COLORS), "every color must appear in training"
    assert {t[1] for t in train} == set(SHAPES), "every shape must appear in training"
    assert {t[2] for t in train} == set(COLORS), "every background must appear in training"
    assert {t[1] for t in held} == set(SHAPES), "every shape should be evaluated"
    return held


_HELD_OUT = _held_out()
_SPLIT_COMBOS = {
    "train": [t for t in all_combos() if t not in _HELD_OUT],
    "heldout": [t for t in all_combos() if t in _HELD_OUT],
}
_SPLIT_STREAM = {"train": 0, "heldout": 1}


def held_out_combos() -> frozenset[tuple[str, str, str]]:
    """The (color, shape, background) combinations never produced by split "train"."""
    return _HELD_OUT


def sample(n: int, seed: int, split: str = "train", color_jitter: float = 0.0) -> list[tuple[np.ndarray, str, Labels]]:
    """`n` (image, caption, labels) triples, deterministic in (n, seed, split, color_jitter); a prefix of a longer draw
    with the same arguments. "train" never uses a held-out combination, "heldout" uses only them. Combination,
    position and size are uniform; `labels.stated` says which attributes the caption states; `color_jitter` as in
    `render`."""
    if split not in _SPLIT_COMBOS:
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    combos = _SPLIT_COMBOS[split]
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM[split]])
    out = []
    for _ in range(int(n)):
        c, s, b = combos[int(rng.integers(len(combos)))]
        pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        labels = Labels(c, s, b, pos, size)
        img = render(labels, rng, color_jitter)
        text, stated = caption_with_stated(labels, rng)
        out.append((img, text, Labels(c, s, b, pos, size, stated=stated)))
    return out


def heldout_prompts() -> list[tuple[str, Labels]]:
    """The fixed evaluation list: every held-out combination at two (position, size) pairs (44 prompts), each caption
    stating color, shape, background, position and size."""
    out = []
    for i, (c, s, b) in enumerate(sorted(_HELD_OUT)):
        for pos, size in ((POSITIONS[i % 5], SIZES[i % 2]), (POSITIONS[(i + 2) % 5], SIZES[(i + 1) % 2])):
            labels = Labels(c, s, b, pos, size)
            out.append((_fill(FULL_TEMPLATE, labels), labels))
    return out


__all__ = [
    "COLORS", "SHAPES", "POSITIONS", "SIZES", "ATTRIBUTES", "Labels", "render", "caption", "caption_with_stated",
    "mislabel", "caption_stating", "jittered_color", "PALETTE_GAP",
    "held_out_combos", "all_combos", "sample", "heldout_prompts", "geometry", "IMAGE_SIZE", "SIZE_PX", "TEMPLATES",
]
