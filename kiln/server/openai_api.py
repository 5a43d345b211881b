"""OpenAI's images API, `/v1`: what chat front ends and agent frameworks speak. The official `openai` client works
unchanged with `base_url="http://host:port/v1"` and an API key of `--api-keys` (or `--token`) as its key.

Each request becomes one job on the same queue as every other front end (the client's lane in the fair queue) and
is answered when the job ends. Every field of OpenAI's request has one of three fates (docs/server.md lists them):
honoured, accepted only at the value that does nothing here (any other is refused naming the field), or unknown
and refused by name. kiln's own fields (`negative_prompt`, `seed`, `steps`, …: the client's `extra_body`) are
honoured as in A1111's API. Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import base64
import io
import logging
import os
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .context import RequestError, Server, server
from .schemas import Img2ImgRequest, Txt2ImgRequest, decode_image

router = APIRouter(prefix="/v1", tags=["OpenAI"])
log = logging.getLogger("kiln.server")

# (accepted values, why any other is refused): OpenAI's fields that have no meaning for kiln's models
NOOP = {
    "quality": ((None, "auto", "standard"), "kiln has one quality; ask for more sampler steps with `steps`"),
    "style": ((None,), "DALL-E 3's vivid/natural styles do not exist here; describe the style in the prompt"),
    "background": ((None, "auto", "opaque"), "images are opaque; a transparent background is not supported"),
    "moderation": ((None, "auto"), "the server's --safety-checker decides; a request cannot change it"),
    "output_format": ((None, "png"), "images are PNG files, with their generation parameters as text"),
    "output_compression": ((None, 100), "images are lossless PNG files"),
    "stream": ((None, False), "streaming is not supported: follow a job's progress at /api/v1/jobs/{id}/events"),
    "partial_images": ((None, 0), "partial images need streaming, which is not supported"),
    "input_fidelity": ((None,), "kiln's inpainting has no fidelity setting"),
}


def _noop(default=None):
    def make(name):
        accepted, why = NOOP[name]
        shown = ", ".join("null" if a is None else str(a).lower() for a in accepted)
        # the accepted values in the schema too: generated and documented requests stay valid
        return Field(default=default, description=f"accepted: {shown}; any other value is refused (422): {why}",
                     json_schema_extra={"enum": list(accepted)})
    return make


class ImageRequest(BaseModel):
    """The fields /images/generations and /images/edits share."""
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name, never dropped

    prompt: str = Field(..., description="what to draw (A1111's prompt syntax: weights, <lora:…> tags)")
    model: str | None = Field(None, description="a checkpoint of GET /v1/models: its id (title), file name, name "
                                                "or SHA-256 (whole, 10 or 8 digits); default: the server's model")
    n: int | None = Field(1, description="images, 1 to the server's max batch size x max batch count")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, multiples of the model's size unit; "
                                               "auto or none: the model's native size (edits: the image's size)")
    response_format: Literal["b64_json", "url"] | None = Field(None, description=(
        "b64_json (default): base64 PNGs in the response; url: links to /api/v1/jobs/{id}/images/{n}, which need "
        "the same credentials and last as long as the server keeps the job"))
    user: str | None = Field(None, description="an end-user id: logged with the job and echoed as safety_identifier")
    safety_identifier: str | None = Field(None, description="as user (wins over it when not empty)")
    quality: str | None = _noop()("quality")
    style: str | None = _noop()("style")
    background: str | None = _noop()("background")
    moderation: str | None = _noop()("moderation")
    output_format: str | None = _noop()("output_format")
    output_compression: int | None = _noop()("output_compression")
    stream: bool | None = _noop()("stream")
    partial_images: int | None = _noop()("partial_images")
    # kiln's own, as in A1111's API (the openai client sends them with extra_body)
    negative_prompt: str | None = Field(None, description="kiln: what not to draw")
    seed: int | None = Field(None, description="kiln: the first image's seed (-1 or none: random); image k has seed+k")
    steps: int | None = Field(None, description="kiln: sampler steps (default 50)")
    cfg_scale: float | None = Field(None, description="kiln: classifier-free guidance scale (default 7)")
    sampler_name: str | None = Field(None, description="kiln: a sampler of /sdapi/v1/samplers (default Euler)")
    scheduler: str | None = Field(None, description="kiln: a schedule of /sdapi/v1/schedulers")


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations (JSON)."""


class EditFields(ImageRequest):
    """The text fields of an edit's multipart form (its files: `image`, `mask`)."""
    input_fidelity: str | None = _noop()("input_fidelity")
    denoising_strength: float | None = Field(None, description="kiln: how much of the image changes, 0-1 (default "
                                                               "1 inside a mask, 0.75 for an edit without one)")
    mask_blur: float | None = Field(None, description="kiln: the mask's edge blur in pixels (default 4)")


EXTENSIONS = ("negative_prompt", "seed", "steps", "cfg_scale", "sampler_name", "scheduler")
ERROR_TYPES = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "not_found"),
               429: ("rate_limit_error", "rate_limit_exceeded"), 503: ("server_error", "server_overloaded")}


def openai_error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind, code = ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    if status == 404 and param == "model":
        code = "model_not_found"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _check_fields(req: ImageRequest):
    unknown = sorted(req.model_extra or {})
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                           "kiln's OpenAI images API (docs/server.md lists the fields)", param=unknown[0])
    for name, (accepted, why) in NOOP.items():
        value = getattr(req, name, None)
        if name in type(req).model_fields and not any(value == a and type(value) is type(a) or value is a
                                                      for a in accepted):
            raise RequestError(f"{name}: {value!r} is not supported: {why}", param=name)
    if not req.prompt.strip():
        raise RequestError("prompt: must not be empty", param="prompt")


def _size(req: ImageRequest, s: Server, default: tuple[int, int]) -> tuple[int, int]:
    if req.size in (None, "", "auto"):
        return default
    w, sep, h = req.size.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise RequestError(f"size: want WIDTHxHEIGHT (e.g. 512x512) or auto, got {req.size!r}", param="size")
    unit, top = s.facts.size_unit, s.limits.max_size
    w, h = int(w), int(h)
    if not (unit <= w <= top and unit <= h <= top) or w % unit or h % unit:
        raise RequestError(f"size: width and height must be multiples of {unit} between {unit} and {top}, got "
                           f"{req.size}", param="size")
    return w, h


def _batches(n: int | None, s: Server) -> tuple[int, int]:
    """n images as (batch_size, n_iter): the largest batch that divides n and fits the server's batch limit."""
    lim = s.limits
    top = lim.max_batch_size * lim.max_n_iter
    n = 1 if n is None else n
    if not 1 <= n <= top:
        raise RequestError(f"n: must be between 1 and {top}, got {n}", param="n")
    batch = max(b for b in range(1, min(n, lim.max_batch_size) + 1) if n % b == 0)
    if n // batch > lim.max_n_iter:
        raise RequestError(f"n: {n} images do not split into at most {lim.max_n_iter} batches of at most "
                           f"{lim.max_batch_size}", param="n")
    return batch, n // batch


def _common(req: ImageRequest, s: Server, size: tuple[int, int]) -> dict:
    """The A1111 request fields this OpenAI request stands for."""
    batch_size, n_iter = _batches(req.n, s)
    fields = dict(prompt=req.prompt, width=size[0], height=size[1], batch_size=batch_size, n_iter=n_iter)
    fields.update({k: getattr(req, k) for k in EXTENSIONS if getattr(req, k) is not None})
    if req.model:
        entry = s.models.find(req.model)
        if entry is None:
            raise RequestError(f"model: no checkpoint {req.model!r}; GET /v1/models lists them", 404, "model")
        fields["override_settings"] = {"sd_model_checkpoint": entry.title}
    return fields


def _run(s: Server, request: Request, req: ImageRequest, body, mode: str) -> dict:
    """Queue the job, wait for it, answer with OpenAI's ImagesResponse."""
    job = s.submit(body, mode, native=True)
    who = req.safety_identifier or req.user
    if who:
        log.info("job %s for end user %r", job.id, who)
    job.done_event.wait()
    if job.state == "failed":
        raise RequestError(job.error, 422 if job.user_error else 500)
    if job.state != "done":
        raise RequestError(f"the job was {job.state} before it finished", 409)
    if req.response_format == "url":
        data = [{"url": str(request.url_for("job_image", job_id=job.id, index=i))} for i in range(len(job.images))]
    else:
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in job.images]
    out = {"created": int(job.created), "data": data, "background": "opaque", "output_format": "png",
           "size": f"{body.width}x{body.height}"}
    if who:
        out["safety_identifier"] = who
    return out


@router.post("/images/generations")
def generations(req: ImageGenerationRequest, request: Request, s: Server = Depends(server)):
    """Text to image: `prompt`, `n`, `size`, `response_format`, `model` (and kiln's own fields)."""
    _check_fields(req)
    native = s.facts.native_size
    body = Txt2ImgRequest(**_common(req, s, _size(req, s, (native, native))))
    return _run(s, request, req, body, "txt2img")


EDIT_FORM = {"type": "object", "required": ["image", "prompt"], "properties": {
    "image": {"type": "string", "format": "binary", "description": "the picture (PNG, JPEG, WebP); without a "
              "mask, its transparent pixels (if any) are the ones to edit"},
    "mask": {"type": "string", "format": "binary", "description": "a PNG the image's size with an alpha channel: "
             "transparent = edit, opaque = keep (partly transparent: blended)"},
    **{k: {"type": "string"} for k in EditFields.model_fields},
}}
EDIT_FORM["properties"]["prompt"] = {"type": "string", "minLength": 1}


@router.post("/images/edits", openapi_extra={"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": EDIT_FORM}}}})
async def edits(request: Request, s: Server = Depends(server)):
    """Inpainting (OpenAI's edits): multipart `image` + `mask` (transparent = edit) + `prompt`; without a mask, the
    image's own transparency, and without that an edit of the whole image (img2img)."""
    try:
        form = await request.form()
    except Exception as e:  # a body that is not a readable multipart form (starlette: HTTPException 400)
        raise RequestError(f"the body must be a multipart form ({getattr(e, 'detail', e)})", 400) from None
    files = {k: v for k, v in form.multi_items() if not isinstance(v, str)}
    texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    image = await _one_file(form, "image", required=True)
    mask = await _one_file(form, "mask", required=False)
    extra = sorted(set(files) - {"image", "image[]", "mask"})
    if extra:
        raise RequestError(f"unknown file field {extra[0]}: an edit takes image and mask", param=extra[0])
    try:
        req = EditFields.model_validate(texts)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        raise RequestError(f"{name}: {err['msg']}", param=name) from None
    return await run_in_threadpool(_edit, s, request, req, image, mask)


async def _one_file(form, name: str, required: bool) -> bytes | None:
    found = form.getlist(name) + (form.getlist(name + "[]") if name == "image" else [])
    found = [f for f in found if not isinstance(f, str)]
    if not found:
        if required or name in form:
            raise RequestError(f"{name}: a file is needed", param=name)
        return None
    if len(found) > 1:
        raise RequestError(f"{name}: kiln edits one image per request, got {len(found)}", param=name)
    return await found[0].read()


def _edit(s: Server, request: Request, req: EditFields, image: bytes, mask: bytes | None) -> dict:
    _check_fields(req)
    limits = s.limits
    picture = decode_image(base64.b64encode(image).decode("ascii"), limits, "image")
    cover = decode_image(base64.b64encode(mask).decode("ascii"), limits, "mask") if mask is not None else None
    repaint = _repaint_mask(picture, cover)
    size = _size(req, s, picture.size)
    if req.size in (None, "", "auto"):
        unit = s.facts.size_unit
        if size[0] % unit or size[1] % unit or max(size) > limits.max_size:
            raise RequestError(f"image: {size[0]}x{size[1]} needs a size: send size with multiples of {unit} up to "
                               f"{limits.max_size}", param="size")
    fields = _common(req, s, size)
    strength = req.denoising_strength if req.denoising_strength is not None else 1.0 if repaint else 0.75
    fields.update(init_images=[_b64png(picture.convert("RGB"))], denoising_strength=strength, resize_mode=0,
                  inpaint_full_res=False)
    if repaint is not None:
        fields.update(mask=_b64png(repaint), mask_blur=4 if req.mask_blur is None else req.mask_blur)
    elif req.mask_blur is not None:
        raise RequestError("mask_blur: given without a mask", param="mask_blur")
    return _run(s, request, req, Img2ImgRequest(**fields), "img2img")


def _has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _repaint_mask(picture, cover):
    """A1111's mask (white = repaint) from OpenAI's (transparent = edit): the mask file's alpha, else the image's
    own when it has transparent pixels; None: no mask (the whole image is edited)."""
    from PIL import ImageOps

    if cover is not None:
        if not _has_alpha(cover):
            raise RequestError("mask: needs an alpha channel (transparent pixels mark what to edit)", param="mask")
        if cover.size != picture.size:
            raise RequestError(f"mask: {cover.size[0]}x{cover.size[1]}, but the image is "
                               f"{picture.size[0]}x{picture.size[1]}: they must be the same size", param="mask")
        return ImageOps.invert(cover.convert("RGBA").getchannel("A"))
    if _has_alpha(picture):
        alpha = picture.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    return None


def _b64png(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _model_card(e) -> dict:
    try:
        created = int(os.path.getmtime(e.path))
    except OSError:
        created = 0
    return {"id": e.title, "object": "model", "created": created, "owned_by": "kiln", "name": e.name,
            "filename": e.filename, "sha256": e.sha256}


@router.get("/models")
def models(s: Server = Depends(server)):
    """The checkpoints `model` may name (as /sdapi/v1/sd-models: id = A1111's title)."""
    return {"object": "list", "data": [_model_card(e) for e in s.models.entries]}


@router.get("/models/{model_id}")
def model(model_id: str, s: Server = Depends(server)):
    entry = s.models.find(model_id)
    if entry is None:
        raise RequestError(f"model: no checkpoint {model_id!r}; GET /v1/models lists them", 404, "model")
    return _model_card(entry)


def install(app: FastAPI):
    """The routes, and OpenAI's error shape for their malformed bodies (elsewhere FastAPI's stays)."""
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)
        err = (exc.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return openai_error(422, f"{param or 'body'}: {err.get('msg', 'invalid')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own errors (unknown /v1 path, wrong method, unreadable JSON) in OpenAI's shape here too
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, exc)
        return openai_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


__all__ = ["install", "openai_error", "router"]
