"""Reading user images and masks: every PIL mode, EXIF rotation, clear errors; A1111's resize modes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import KilnError

RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")
MAX_PIXELS = 64_000_000


def load_image(path_or_image, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path or PIL image: EXIF orientation applied; RGBA/LA composited on white; CMYK, P,
    L, 16-bit and float images converted with their full range."""
    if isinstance(path_or_image, Image.Image):
        im = path_or_image
    else:
        path = Path(path_or_image)
        if not path.exists():
            raise KilnError(f"{what} {path}: no such file")
        if path.is_dir():
            raise KilnError(f"{what} {path}: is a folder, not an image")
        try:
            im = Image.open(path)
            if im.width * im.height > MAX_PIXELS:
                raise KilnError(f"{what} {path}: {im.width}x{im.height} is too large (limit {MAX_PIXELS:,} pixels)")
            im.load()
        except UnidentifiedImageError:
            raise KilnError(f"{what} {path}: not an image file PIL can read") from None
        except Image.DecompressionBombError:
            raise KilnError(f"{what} {path}: too large to decode safely") from None
        except OSError as e:
            raise KilnError(f"{what} {path}: cannot read it ({e})") from None
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_mask(path_or_image, size: tuple[int, int], notices: list | None = None) -> np.ndarray:
    """A mask as float32 [H, W] in [0, 1] (white = repaint), resized to `size` = (W, H) when it differs (with a
    notice). Alpha-only masks: a transparent pixel means repaint."""
    if isinstance(path_or_image, Image.Image):
        im = path_or_image
    else:
        im = Image.open(path_or_image) if Path(path_or_image).is_file() else None
        if im is None:
            raise KilnError(f"mask {path_or_image}: no such file")
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA") and np.asarray(im.convert("RGBA"))[..., :3].max() == 0:
        g = Image.fromarray(255 - np.asarray(im.convert("RGBA"))[..., 3])  # drawn as transparency
    else:
        g = to_rgb(im).convert("L")
    if g.size != tuple(size):
        if notices is not None:
            notices.append(f"the mask is {g.size[0]}x{g.size[1]}, the image {size[0]}x{size[1]}: mask resized")
        g = g.resize(tuple(size), Image.BILINEAR)
    return np.asarray(g, dtype=np.float32) / 255.0


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return mask
    im = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(im, dtype=np.float32) / 255.0


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window along the first two axes (edges repeated), by cumulative sums."""
    for axis in (0, 1):
        n = a.shape[axis]
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
        a = (np.take(c, range(2 * r + 1, 2 * r + 1 + n), axis=axis) - np.take(c, range(n), axis=axis)) / (2 * r + 1)
    return a


def fill_masked(px: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's inpainting fill "fill": the masked area (mask ≥ 0.5) painted with the colors around it, coarse to
    fine (a normalised blur of the known pixels at shrinking radii; finer estimates win where they reach)."""
    known = (mask < 0.5).astype(np.float64)
    if known.all() or not known.any():
        return px
    src = px.astype(np.float64) * known[..., None]
    out = np.zeros_like(src)
    for r in (256, 64, 16, 4, 2, 1):
        r = min(r, max(px.shape[:2]))
        den = _box_blur(_box_blur(known, r), r)  # two box passes: close to a Gaussian, cheap at any radius
        num = _box_blur(_box_blur(src, r), r)
        reach = den > 1e-3
        out[reach] = num[reach] / den[reach, None]
    out = np.where(known[..., None] > 0, px, out)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def fit(im: Image.Image, width: int, height: int, mode: str = "just-resize") -> Image.Image:
    """A1111's resize modes: stretch; crop to the aspect ratio then resize; resize inside and fill the borders by
    stretching the image's edge pixels."""
    if mode not in RESIZE_MODES:
        raise KilnError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    if im.size == (width, height):
        return im
    if mode == "just-resize":
        return im.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == "crop-and-resize":
        w, h = (width, round(width / src_ratio)) if ratio > src_ratio else (round(height * src_ratio), height)
        r = im.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return r.crop((left, top, left + width, top + height))
    w, h = (round(height * src_ratio), height) if ratio > src_ratio else (width, round(width / src_ratio))
    r = im.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(r, (left, top))
    a = np.asarray(out).copy()
    if left > 0:
        a[:, :left] = a[:, left:left + 1]
        a[:, left + w:] = a[:, left + w - 1:left + w]
    if top > 0:
        a[:top] = a[top:top + 1]
        a[top + h:] = a[top + h - 1:top + h]
    return Image.fromarray(a)


def model_size(width: int, height: int, unit: int = 8) -> tuple[int, int]:
    """Round down to the model's unit (8 pixels for SD; CompVis' img2img rounded to 32, which then mismatched its
    64-pixel assumptions). Never below one unit."""
    return max(unit, width - width % unit), max(unit, height - height % unit)


def outpaint_canvas(im: Image.Image, left: int, right: int, top: int, bottom: int):
    """The image on a larger canvas (new borders filled with the edge pixels stretched outwards) and the mask of the
    new area (1 = to paint)."""
    if min(left, right, top, bottom) < 0:
        raise KilnError("outpainting margins must not be negative")
    w, h = im.width + left + right, im.height + top + bottom
    a = np.asarray(im)
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones((h, w), np.float32)
    mask[top:top + im.height, left:left + im.width] = 0
    return Image.fromarray(canvas), mask


def _grow(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened by `grow` around its centre, shifted back inside [0, limit) (and cut at its ends)."""
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if lo < 0:
        hi, lo = min(hi - lo, limit), 0
    if hi > limit:
        lo, hi = max(lo - (hi - limit), 0), limit
    return lo, hi


def mask_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) around the mask's non-zero pixels, grown by `padding` and then to the aspect ratio
    width:height, kept inside the image (A1111's "only masked" crop)."""
    ys, xs = np.nonzero(mask > 0)
    H, W = mask.shape
    if len(xs) == 0:
        return 0, 0, W, H
    x0, y0 = max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0)
    x1, y1 = min(int(xs.max()) + 1 + padding, W), min(int(ys.max()) + 1 + padding, H)
    want = width / height
    if (x1 - x0) / (y1 - y0) < want:  # too tall: widen
        x0, x1 = _grow(x0, x1, round((y1 - y0) * want) - (x1 - x0), W)
    else:  # too wide: heighten
        y0, y1 = _grow(y0, y1, round((x1 - x0) / want) - (y1 - y0), H)
    return x0, y0, x1, y1
