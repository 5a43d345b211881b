"""Deterministic pixel analyzer for captioned-shapes images (no neural network; numpy + PIL only).

`analyze` reads one image and reports its background color, shape color, shape class, position and size in the
vocabulary of `kiln.demo.shapes`; `score` turns (image, labels) pairs into per-attribute accuracies. It is meant to
judge images made by a diffusion model trained on `kiln.demo.shapes`, so every step is chosen to survive mild noise
and blur:

  1. the image is resized to 64x64 (BOX down / BILINEAR up) if needed;
  2. background = per-channel median of a 2-px border ring, named by the nearest palette color;
  3. every pixel's RGB distance `d` to that measured background; the shape "level" is the 90th percentile of `d`
     over pixels clearly off the background (d > 40), and the mask is d > level / 2 (a 50%-coverage cut, so areas
     do not depend on the contrast of the color pair), keeping the largest 8-connected component;
  4. shape color = per-channel median of the component's pixels with d >= 0.75 * level (its interior), nearest palette;
  5. position from the component's bounding-box center (that is what `shapes.render` places): "center" when both
     offsets from the image center are under 6 px, otherwise the dominant axis and its sign;
  6. each pixel's partial coverage: its projection on the background->shape color axis, clipped to [0, 1], snapped
     to 0 / 1 within 0.2 of either end (that removes nearly all noise) and kept only in and around the component;
  7. shape from the radial profile r(theta) about the coverage centroid (coverage summed along 90 rays): the
     normalised amplitudes of its 3rd, 4th and 5th angular harmonics. An upright or rotated triangle only has
     multiples of 3, a square of 4, a 5-pointed star of 5 (ideal amplitudes ~0.27, ~0.14, ~0.30) and a circle none:
     "circle" when the largest of the three is under 0.06, else the shape of the largest. Blur shrinks but does not
     reorder these, which is why this is used rather than fill ratio / solidity (fill is kept as a diagnostic);
  8. size from the coverage area (which blur and zero-mean noise leave nearly unchanged) and the shape found in 7:
     across = sqrt(area / area-of-that-shape-1-px-across), "large" from 24 px (small is 18 +- 2, large 30 +- 2).

No component of at least `MIN_AREA` pixels means no shape: shape, color, position and size are all "none".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import _POLYGONS, ATTRIBUTES, COLORS, IMAGE_SIZE, Labels

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float64)

BORDER = 2
CANDIDATE_DISTANCE = 40.0
MIN_AREA = 20
CENTER_DEAD_ZONE = 6.0
LARGE_FROM = 24.0
SNAP = 0.2
CIRCLE_BELOW = 0.06
_RAY_ANGLES = np.linspace(0.0, 2.0 * np.pi, 90, endpoint=False)
_RAY_STEP = 0.25
_RAY_RADII = np.arange(0.0, IMAGE_SIZE * 1.5, _RAY_STEP)
_HARMONIC_SHAPES = {3: "triangle", 4: "square", 5: "star"}


def _polygon_area(pts) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2.0


# Area of each shape drawn `s` px across, over s**2 (circle pi/4, square 1, triangle sqrt(3)/4, star ~0.37).
AREA_PER_SIZE2 = {"circle": np.pi / 4, **{k: _polygon_area(_POLYGONS[k]) for k in ("square", "triangle", "star")}}


@dataclass
class Analysis:
    background: str
    color: str
    shape: str
    position: str
    size: str
    # Diagnostics (not compared by `score`).
    area: int = 0  # pixels in the thresholded component
    fill: float = 0.0  # coverage area / (longest vertical chord * longest horizontal chord); square 1, circle .785
    harmonics: tuple[float, float, float] = (0.0, 0.0, 0.0)  # radial-profile amplitudes of orders 3, 4, 5
    extent: tuple[float, float] = (0.0, 0.0)  # coverage width, height in px
    across: float = 0.0  # estimated size (bounding box's larger side) in px, from the coverage area
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive)


def nearest_color(rgb) -> str:
    """The palette name nearest (Euclidean RGB) to `rgb`."""
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(np.argmin(d))]


def _to_rgb64(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W, 3] image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        down = a.shape[0] >= IMAGE_SIZE and a.shape[1] >= IMAGE_SIZE
        resample = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((IMAGE_SIZE, IMAGE_SIZE), resample))
    return a.astype(np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (min-label propagation with pointer jumping)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w
    idx = np.arange(big, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, idx, big)
    pad = np.full((h + 2, w + 2), big, dtype=np.int64)
    while True:
        pad[1:-1, 1:-1] = lab
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    np.minimum(m, pad[dy:dy + h, dx:dx + w], out=m)
        m = np.where(mask, m, big)
        # Pointer jumping: a pixel's label is a pixel index, so follow labels to their own labels.
        flat = m.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside]])
        if np.array_equal(m, lab):
            break
        lab = m
    counts = np.bincount(lab[mask])
    return lab == int(np.argmax(counts))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), dtype=bool)
    pad[1:-1, 1:-1] = mask
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= pad[dy:dy + h, dx:dx + w]
    return out


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample `img` (zero outside) at continuous pixel coordinates (pixel i covers [i, i+1))."""
    h, w = img.shape
    pad = np.zeros((h + 2, w + 2), dtype=np.float64)
    pad[1:-1, 1:-1] = img
    x = np.clip(x + 0.5, 0.0, w + 1.0 - 1e-9)  # +1 for the pad, -0.5 for pixel centers
    y = np.clip(y + 0.5, 0.0, h + 1.0 - 1e-9)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w + 1), np.minimum(y0 + 1, h + 1)
    return (pad[y0, x0] * (1 - fx) * (1 - fy) + pad[y0, x1] * fx * (1 - fy)
            + pad[y1, x0] * (1 - fx) * fy + pad[y1, x1] * fx * fy)


def radial_harmonics(cov: np.ndarray) -> tuple[float, float, float]:
    """Amplitudes (relative to the mean radius) of the 3rd, 4th and 5th angular harmonics of the radial profile of
    a coverage map about its centroid; each ray's radius is the coverage summed along it."""
    total = float(cov.sum())
    if total <= 0:
        return (0.0, 0.0, 0.0)
    ys, xs = np.indices(cov.shape)
    cx = float((cov * (xs + 0.5)).sum()) / total
    cy = float((cov * (ys + 0.5)).sum()) / total
    on = cov > 0
    reach = float(np.sqrt(((xs[on] + 0.5 - cx) ** 2 + (ys[on] + 0.5 - cy) ** 2).max())) + 1.5
    radii = _RAY_RADII[: int(np.searchsorted(_RAY_RADII, reach)) + 1]
    px = cx + np.cos(_RAY_ANGLES)[:, None] * radii[None, :]
    py = cy + np.sin(_RAY_ANGLES)[:, None] * radii[None, :]
    r = _bilinear(cov, px, py).sum(axis=1) * _RAY_STEP
    spec = np.abs(np.fft.rfft(r))
    if spec[0] <= 0:
        return (0.0, 0.0, 0.0)
    return tuple(float(2.0 * spec[k] / spec[0]) for k in (3, 4, 5))


def classify_shape(harmonics: tuple[float, float, float]) -> str:
    """circle / triangle / square / star from the radial harmonics of orders 3, 4, 5."""
    k = int(np.argmax(harmonics))
    if harmonics[k] < CIRCLE_BELOW:
        return "circle"
    return _HARMONIC_SHAPES[3 + k]


def analyze(img: np.ndarray) -> Analysis:
    """Background color, shape color, shape class, position and size of one captioned-shapes image."""
    a = _to_rgb64(img)
    h, w, _ = a.shape
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    bg_rgb = np.median(a[ring], axis=0)
    background = nearest_color(bg_rgb)

    d = np.sqrt(((a - bg_rgb) ** 2).sum(axis=2))
    cand = d > CANDIDATE_DISTANCE
    if cand.sum() < MIN_AREA:
        return Analysis(background, "none", "none", "none", "none")
    level = float(np.percentile(d[cand], 90))
    comp = _largest_component(d > max(CANDIDATE_DISTANCE * 0.75, level / 2))
    area = int(comp.sum())
    if area < MIN_AREA:
        return Analysis(background, "none", "none", "none", "none")

    core = comp & (d >= 0.75 * level)
    if core.sum() < 3:
        core = comp
    color = nearest_color(np.median(a[core], axis=0))

    ys = np.flatnonzero(comp.any(axis=1))
    xs = np.flatnonzero(comp.any(axis=0))
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ox, oy = cx - w / 2, cy - h / 2
    if max(abs(ox), abs(oy)) < CENTER_DEAD_ZONE:
        position = "center"
    elif abs(ox) >= abs(oy):
        position = "left" if ox < 0 else "right"
    else:
        position = "top" if oy < 0 else "bottom"

    # Partial coverage per pixel: the projection on the background->shape color axis (unbiased under zero-mean
    # noise; antialiased or blurred edges keep their share), snapped at both ends and kept near the component only.
    v = np.median(a[core], axis=0) - bg_rgb
    cov = ((a - bg_rgb) @ v) / max(float(v @ v), 1e-6)
    cov = np.where(_dilate(_dilate(comp)), np.clip(cov, 0.0, 1.0), 0.0)
    cov[cov >= 1.0 - SNAP] = 1.0
    cov[cov <= SNAP] = 0.0
    soft_area = float(cov.sum())
    width, height = float(cov.max(axis=0).sum()), float(cov.max(axis=1).sum())
    fill = soft_area / max(float(cov.sum(axis=0).max() * cov.sum(axis=1).max()), 1.0)
    harmonics = radial_harmonics(cov)
    shape = classify_shape(harmonics)
    # Size across (bounding box's larger side) from the coverage area, which blur and noise leave nearly unchanged,
    # and the shape's area per squared size.
    across = float(np.sqrt(soft_area / AREA_PER_SIZE2[shape]))
    size = "large" if across >= LARGE_FROM else "small"
    return Analysis(background, color, shape, position, size, area=area, fill=fill, harmonics=harmonics,
                    extent=(width, height), across=across, bbox=(x0, y0, x1, y1))


def score(pairs: list[tuple[np.ndarray, Labels]], *, only_stated: bool = False) -> dict[str, float]:
    """Accuracy of `analyze` against `labels` per attribute (color, background, shape, position, size) and "all"
    (all five right). With `only_stated`, each attribute counts only over pairs whose `labels.stated` names it
    (NaN when none does) and "all" asks only for the stated attributes; the default judges all five everywhere."""
    hits = {k: 0 for k in ATTRIBUTES}
    totals = {k: 0 for k in ATTRIBUTES}
    all_hits = 0
    for img, labels in pairs:
        got = analyze(img)
        ok_all = True
        for k in ATTRIBUTES:
            if only_stated and k not in labels.stated:
                continue
            totals[k] += 1
            ok = getattr(got, k) == getattr(labels, k)
            hits[k] += ok
            ok_all &= ok
        all_hits += ok_all
    out = {k: (hits[k] / totals[k] if totals[k] else float("nan")) for k in ATTRIBUTES}
    out["all"] = all_hits / len(pairs) if pairs else float("nan")
    return out


__all__ = ["Analysis", "analyze", "score", "nearest_color", "classify_shape", "radial_harmonics"]
