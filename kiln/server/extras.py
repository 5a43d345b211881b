"""A1111's "Extras" tab over HTTP: `POST /sdapi/v1/extra-single-image` and `/extra-batch-images`, with the plain
upscalers of `kiln.upscalers` (None, Lanczos, Nearest). Face restoration needs GFPGAN/CodeFormer weights, which
kiln does not have: a non-zero visibility is refused. The images are resized in the request's thread (no model is
involved, so nothing waits in the generation queue)."""
from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, Depends
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from .. import upscalers
from ..errors import KilnError
from ..pipeline.infotext import quote
from .context import RequestError, Server, server
from .schemas import decode_image

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
NO_FACES = "needs face-restoration weights (GFPGAN, CodeFormer), which kiln does not have"


class ExtrasRequest(BaseModel):
    """A1111's ExtrasBaseRequest, with its defaults."""
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name (`_check`)

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = Field(True, description="accepted, no effect: A1111's API always returns them")
    gfpgan_visibility: float = Field(0, ge=0, le=1, description=f"0 only: GFPGAN {NO_FACES}")
    codeformer_visibility: float = Field(0, ge=0, le=1, description=f"0 only: CodeFormer {NO_FACES}")
    codeformer_weight: float = Field(0, ge=0, le=1, description="accepted, no effect without CodeFormer")
    upscaling_resize: float = Field(2, gt=0, le=8, description="the scale (resize_mode 0)")
    upscaling_resize_w: int = Field(512, ge=1, description="target width (resize_mode 1)")
    upscaling_resize_h: int = Field(512, ge=1, description="target height (resize_mode 1)")
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop (or pad) to exactly the target size")
    upscaler_1: str = Field("None", description="None, Lanczos or Nearest (None: the image is returned as it is)")
    upscaler_2: str = Field("None", description="a second upscaler, blended in by extras_upscaler_2_visibility")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = Field(False, description="accepted, no effect: there is no face restoration to order")


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData]  # noqa: N815 (A1111's name)


# A1111's interrogate field, which its own test suite posts to extra-single-image; A1111 ignores it there
IGNORED = {"model"}


def _check(req: ExtrasRequest):
    unknown = sorted(set(req.model_extra or {}) - IGNORED)
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                           "A1111's extras request")
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name):
            raise RequestError(f"{name}: face restoration {NO_FACES} (accepted: 0)")
    try:
        names = upscalers.find(req.upscaler_1), upscalers.find(req.upscaler_2)
    except KilnError as e:
        raise RequestError(str(e)) from None
    return names


def _scaled(image, name, scale, limits):
    """A1111's Upscaler.upscale: the upscaler's own resize by `scale`, then Lanczos to the size rounded down to a
    multiple of 8 where that differs."""
    dest = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    if min(dest) < 8 or dest[0] * dest[1] > limits.max_image_pixels:
        raise RequestError(f"the upscaled size {dest[0]}x{dest[1]} is outside 8 pixels to the server's limit of "
                           f"{limits.max_image_pixels:,} pixels")
    image = upscalers.upscale(image, int(image.width * scale), int(image.height * scale), name)
    return image if image.size == dest else upscalers.upscale(image, *dest, "Lanczos")


def _upscale(image, name, req, info, limits):
    if req.resize_mode == 1:
        scale = max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
        info["Postprocess upscale to"] = f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"
    else:
        scale = req.upscaling_resize
        info["Postprocess upscale by"] = f"{scale:g}"
    image = _scaled(image, name, scale, limits)
    if req.resize_mode == 1 and req.upscaling_crop:  # centred on a black canvas of the target size, as A1111
        canvas = Image.new("RGB", (req.upscaling_resize_w, req.upscaling_resize_h))
        canvas.paste(image, (canvas.width // 2 - image.width // 2, canvas.height // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def process(image: Image.Image, req: ExtrasRequest, names, limits) -> tuple[Image.Image, str]:
    """One image through A1111's upscale step: (the result, its "postprocessing" infotext). Upscaler 1 None:
    the image unchanged, as A1111."""
    first, second = names
    chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    image, info = image.convert("RGB"), {}
    if first != "None":
        out = _upscale(image, first, req, info, limits)
        info["Postprocess upscaler"] = first
        if second != "None" and req.extras_upscaler_2_visibility > 0:
            out = Image.blend(out, _upscale(image, second, req, {}, limits), req.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second
        image = out
    text = ", ".join(f"{k}: {quote(v)}" for k, v in info.items())
    image.info = {**chunks, **({"postprocessing": text} if text else {})}
    return image, text


def _b64(image: Image.Image) -> str:
    """A PNG keeping the input's text chunks plus "postprocessing" (as A1111's encode_pil_to_base64)."""
    import io

    meta = PngImagePlugin.PngInfo()
    for k, v in image.info.items():
        meta.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html(text: str) -> str:
    import html

    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


@router.post("/extra-single-image")
def extra_single_image(req: ExtrasSingleImageRequest, s: Server = Depends(server)):
    names = _check(req)
    if not req.image:
        raise RequestError("image: empty")
    image, text = process(decode_image(req.image, s.limits, "image"), req, names, s.limits)
    return {"html_info": _html(text), "image": _b64(image)}


@router.post("/extra-batch-images")
def extra_batch_images(req: ExtrasBatchImagesRequest, s: Server = Depends(server)):
    names = _check(req)
    if not req.imageList:
        raise RequestError("imageList: no images")
    if len(req.imageList) > s.limits.max_batch_size * s.limits.max_n_iter:
        raise RequestError(f"imageList: at most {s.limits.max_batch_size * s.limits.max_n_iter} images at once")
    results = [process(decode_image(f.data, s.limits, f"imageList[{i}]"), req, names, s.limits)
               for i, f in enumerate(req.imageList)]
    return {"html_info": _html(results[0][1]), "images": [_b64(im) for im, _ in results]}
