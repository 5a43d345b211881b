"""Named image upscalers, by the names A1111 lists them: the plain resamplers. (Model upscalers such as ESRGAN will
join this table; a name that is not here is an error, never a silent fallback.)"""
from __future__ import annotations

from PIL import Image

from .errors import KilnError

# A1111's names (lowercase lookups); "None" keeps the image as it is (A1111's extras: no upscaling).
RESAMPLERS = {"none": None, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
NAMES = ("None", "Lanczos", "Nearest")


def find(name: str | None) -> str:
    """The canonical name of an upscaler (case-insensitive), or a one-line error listing the ones there are."""
    key = (name or "None").strip().lower()
    if key not in RESAMPLERS:
        raise KilnError(f"upscaler {name!r} is not available; choose one of {', '.join(NAMES)}")
    return NAMES[list(RESAMPLERS).index(key)]


def upscale(image: Image.Image, width: int, height: int, name: str | None = "Lanczos") -> Image.Image:
    """`image` resized to width x height by the named upscaler ("None": returned unchanged)."""
    method = RESAMPLERS[find(name).lower()]
    if method is None or image.size == (width, height):
        return image
    return image.resize((width, height), method)
