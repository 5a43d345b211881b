"""A1111's Extras upscale step (scripts/postprocessing_upscale.py), for `kiln upscale` and the extras API: resize by
a factor or to a size (then crop or pad to it), with a first upscaler and a second one blended in by its
visibility. The result keeps the source's text chunks (its "parameters") and gains A1111's "postprocessing" text:
"Postprocess upscale by" (or "… upscale to", "… crop to"), "Postprocess upscaler", "Postprocess upscaler 2"."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..errors import KilnError
from .infotext import quote
from .upscalers import Upscalers


@dataclass(frozen=True)
class ExtrasUpscale:
    upscaler_1: str = "None"  # "None": the picture as it is (A1111)
    upscaler_2: str = "None"
    visibility_2: float = 0.0  # how much of upscaler 2 is blended in (0 … 1)
    scale: float = 2.0  # resize by this (when `size` is None)
    size: tuple[int, int] | None = None  # resize to (width, height): the scale that covers it
    crop: bool = True  # with `size`: centre the picture on a black canvas of exactly that size, as A1111


def dest_size(image: Image.Image, scale: float, max_pixels: int | None) -> tuple[int, int]:
    """A1111's target of a resize by `scale`: rounded down to a multiple of 8; refused outside 8 pixels to the limit."""
    dest = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    if min(dest) < 8 or (max_pixels is not None and dest[0] * dest[1] > max_pixels):
        limit = f" to the limit of {max_pixels:,} pixels" if max_pixels is not None else ""
        raise KilnError(f"the upscaled size {dest[0]}x{dest[1]} is outside 8 pixels{limit}")
    return dest


def scaled(image: Image.Image, name: str, scale: float, ups: Upscalers, max_pixels: int | None) -> Image.Image:
    """A1111's Upscaler.upscale: the upscaler's own resize to `scale`, to the size rounded down to a multiple of 8."""
    return ups.upscale(image, *dest_size(image, scale, max_pixels), name)


def _one(image, name, x: ExtrasUpscale, ups, max_pixels, info) -> Image.Image:
    if x.size is not None:
        info["Postprocess upscale to"] = "{}x{}".format(*x.size)
    else:
        info["Postprocess upscale by"] = str(float(x.scale))  # A1111 writes the float as Python prints it: "2.0"
    image = scaled(image, name, _scale(image, x), ups, max_pixels)
    if x.size is not None and x.crop:
        canvas = Image.new("RGB", x.size)
        canvas.paste(image, (canvas.width // 2 - image.width // 2, canvas.height // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def _scale(image: Image.Image, x: ExtrasUpscale) -> float:
    return max(x.size[0] / image.width, x.size[1] / image.height) if x.size else x.scale


def extras_upscale(image: Image.Image, x: ExtrasUpscale, ups: Upscalers, max_pixels: int | None = None
                   ) -> tuple[Image.Image, str]:
    """One picture through the upscale step: (the result, its "postprocessing" text). The result's `info` holds
    the source's text chunks and "postprocessing"."""
    first, second = ups.canonical(x.upscaler_1), ups.canonical(x.upscaler_2)
    chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    image, info = image.convert("RGB"), {}
    if first != "None":
        dest_size(image, _scale(image, x), max_pixels)  # refused before any model runs
        out = _one(image, first, x, ups, max_pixels, info)
        info["Postprocess upscaler"] = first
        if second != "None" and x.visibility_2 > 0:
            out = Image.blend(out, _one(image, second, x, ups, max_pixels, {}), x.visibility_2)
            info["Postprocess upscaler 2"] = second
        image = out
    text = ", ".join(f"{k}: {quote(v)}" for k, v in info.items())
    image.info = {**chunks, **({"postprocessing": text} if text else {})}
    return image, text
