"""A1111's "Extras" tab over HTTP: `POST /sdapi/v1/extra-single-image` and `/extra-batch-images`, with every
upscaler of the server's registry (`kiln.pipeline.upscalers`: None, Lanczos, Nearest and the model upscalers of
--upscaler-dir and models/ESRGAN, …, by name). Face restoration needs GFPGAN/CodeFormer weights, which kiln does not
have: a non-zero visibility is refused. The images are upscaled in the request's thread (an upscaler model is small
beside a checkpoint: nothing waits in the generation queue)."""
from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, Depends
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from ..errors import KilnError
from ..pipeline.extras import ExtrasUpscale, extras_upscale
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
    upscaler_1: str = Field("None", description="an upscaler's name, as GET /sdapi/v1/upscalers lists them (None: "
                            "the image is returned as it is)")
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


def _check(req: ExtrasRequest, s: Server) -> ExtrasUpscale:
    unknown = sorted(set(req.model_extra or {}) - IGNORED)
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                           "A1111's extras request")
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name):
            raise RequestError(f"{name}: face restoration {NO_FACES} (accepted: 0)")
    names = []
    for field in ("upscaler_1", "upscaler_2"):
        try:
            names.append(s.upscalers.canonical(getattr(req, field), paths=False))
        except KilnError as e:
            raise RequestError(f"{field}: {e}") from None
    size = (req.upscaling_resize_w, req.upscaling_resize_h) if req.resize_mode == 1 else None
    return ExtrasUpscale(*names, req.extras_upscaler_2_visibility, req.upscaling_resize, size, req.upscaling_crop)


def process(image: Image.Image, x: ExtrasUpscale, s: Server) -> tuple[Image.Image, str]:
    try:
        return extras_upscale(image, x, s.upscalers, s.limits.max_image_pixels)
    except KilnError as e:
        raise RequestError(str(e)) from None


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
    x = _check(req, s)
    if not req.image:
        raise RequestError("image: empty")
    image, text = process(decode_image(req.image, s.limits, "image"), x, s)
    return {"html_info": _html(text), "image": _b64(image)}


@router.post("/extra-batch-images")
def extra_batch_images(req: ExtrasBatchImagesRequest, s: Server = Depends(server)):
    x = _check(req, s)
    if not req.imageList:
        raise RequestError("imageList: no images")
    if len(req.imageList) > s.limits.max_batch_size * s.limits.max_n_iter:
        raise RequestError(f"imageList: at most {s.limits.max_batch_size * s.limits.max_n_iter} images at once")
    results = [process(decode_image(f.data, s.limits, f"imageList[{i}]"), x, s)
               for i, f in enumerate(req.imageList)]
    return {"html_info": _html(results[0][1]), "images": [_b64(im) for im, _ in results]}
