"""Request bodies as AUTOMATIC1111 names them (every field of A1111's, sorted in `fields.py` into honoured,
UI-only and refused-unless-a-no-op; a field A1111 does not have is refused), and their translation into a
validated `Job` for the worker. The native API takes the same bodies."""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import secrets
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ..errors import KilnError
from ..samplers import MAX_STEPS, SAMPLERS, parse
from ..styles import StyleTable
from .context import RequestError
from .fields import REFUSED, UI_ONLY, check_fields, show
from .options import Context, validate
from .worker import Job, Limits


def _refused(default, name: str):
    """A field accepted only at a value that does nothing: its accepted values in the schema (so generated and
    documented requests stay valid), the reason in its description (fields.REFUSED)."""
    r = REFUSED[name]
    return Field(default=default, description=f"accepted: {show(r.accepted)}{r.also if r.same_as else ''}; "
                                              f"any other value is refused (422): {r.why}",
                 json_schema_extra={"enum": list(r.accepted)} if r.same_as is None else None)


def _ui_only(default, name: str):
    return Field(default=default, description=f"accepted, no effect: {UI_ONLY[name]}")


class GenerationRequest(BaseModel):
    """The fields A1111's txt2img and img2img requests share (fields.py sorts them into groups)."""
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in `to_job`, not dropped

    prompt: str | list[str] = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = _refused(None, "restore_faces")
    tiling: bool | None = None
    do_not_save_samples: bool | None = _ui_only(False, "do_not_save_samples")
    do_not_save_grid: bool | None = _ui_only(False, "do_not_save_grid")
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = _refused(None, "s_min_uncond")
    s_churn: float | None = _refused(None, "s_churn")
    s_tmax: float | None = _refused(None, "s_tmax")
    s_tmin: float | None = _refused(None, "s_tmin")
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None  # a model of GET /sd-models that runs the last steps (SDXL refiner)
    refiner_switch_at: float | None = None  # the fraction of the steps before it takes over (0.8 when not given)
    disable_extra_networks: bool | None = _refused(False, "disable_extra_networks")
    firstpass_image: str | None = _refused(None, "firstpass_image")
    comments: dict[str, Any] | None = _ui_only(None, "comments")
    force_task_id: str | None = None
    script_name: str | None = None  # one of GET /sdapi/v1/scripts (case-insensitive), run with script_args
    script_args: list[Any] | None = None
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default=None, description=(
        "{\"controlnet\": {\"args\": [unit, ...]}}: sd-webui-controlnet's units (docs/controlnet.md); "
        "no other always-on script is available"))
    infotext: str | None = _refused(None, "infotext")


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool | None = False
    firstphase_width: int | None = _refused(0, "firstphase_width")
    firstphase_height: int | None = _refused(0, "firstphase_height")
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = _refused(None, "hr_checkpoint_name")
    hr_sampler_name: str | None = _refused(None, "hr_sampler_name")
    hr_scheduler: str | None = _refused(None, "hr_scheduler")
    hr_prompt: str | None = _refused("", "hr_prompt")
    hr_negative_prompt: str | None = _refused("", "hr_negative_prompt")


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = _ui_only(None, "image_cfg_scale")
    mask: str | None = None
    mask_blur_x: float | None = 4
    mask_blur_y: float | None = 4
    mask_blur: float | None = None
    mask_round: bool | None = _refused(None, "mask_round")
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = _refused(None, "initial_noise_multiplier")
    latent_mask: str | None = _refused(None, "latent_mask")
    include_init_images: bool | None = Field(default=False)


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


RESIZE = {0: "just-resize", 1: "crop-and-resize", 2: "resize-and-fill", 3: "just-resize"}
FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
MAX_SEED = 2 ** 63 - 1


def decode_image(data: str, limits: Limits, what: str) -> Image.Image:
    """A base64 image (optionally a data: URL) decoded safely: size checked before the pixels are decoded."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what}: empty image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_body_bytes * 4 // 3 + 4:
        raise RequestError(f"{what}: too large")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > limits.max_image_pixels:
            raise RequestError(f"{what}: {im.width}x{im.height} is larger than the server's limit of "
                               f"{limits.max_image_pixels:,} pixels")
        im.load()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(f"{what}: larger than the server's limit of {limits.max_image_pixels:,} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{what}: not an image the server can read") from None
    return im


def _finite(name, v, lo, hi):
    if v is None:
        return None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(f"{name} must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _int(name, v, lo, hi):
    if not lo <= v <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {v}")
    return int(v)


def _random_seed() -> int:
    return secrets.randbelow(4294967294)


def to_job(req: GenerationRequest, mode: str, limits: Limits, facts, options: dict, models=None,
           styles=None, save_default: bool = False, controlnets=None, upscalers=None) -> Job:
    """Validate an A1111-style request against the limits, the server's settings (`options`, with the request's
    `override_settings`) and styles, and the loaded model (its `ModelFacts`); the worker's job for it:
    `GenerationParams` fields, with the init image and mask as images; `controlnets`: the ControlNet files'
    index (`controlnet.ControlNetIndex`) the request's units name."""
    from .controlnet import alwayson

    check_fields(req, mode)
    steps = _int("steps", req.steps if req.steps is not None else 50, 1, limits.max_steps)
    batch_size = _int("batch_size", req.batch_size or 1, 1, limits.max_batch_size)
    n_iter = _int("n_iter", req.n_iter or 1, 1, limits.max_n_iter)
    prompts, negative = _prompts(req, limits, styles, batch_size)
    unit = facts.size_unit
    size = {}
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is None or (mode == "img2img" and v == 0):
            size[name] = None
            continue
        if not unit <= v <= limits.max_size or v % unit:
            raise RequestError(f"{name} must be a multiple of {unit} between {unit} and {limits.max_size}, got {v}")
        size[name] = int(v)
    sampler_name = req.sampler_name or req.sampler_index or "Euler"
    try:
        # A1111 ignores Karras etc. for DDIM. None (no scheduler): the default of the model that runs the job
        spec, schedule = parse(sampler_name, req.scheduler, lenient=True)
    except ValueError as e:
        status = 404 if "sampler" in str(e) else 422
        raise RequestError(("Sampler not found: " if status == 404 else "") + str(e), status) from None
    # A1111 ignores eta for samplers that have none (clients such as webuiapi always send one)
    eta = _finite("eta", req.eta, 0.0, spec.eta_max or 10.0) if spec.eta is not None else None
    most = MAX_STEPS.get(schedule or spec.schedule)  # the lcm schedule (TCD's default) has 50 steps to pick from
    if most is not None and steps > most:
        raise RequestError(f"steps: the {schedule or spec.schedule} schedule has at most {most} steps, got {steps}")
    seed = req.seed if req.seed is not None else -1
    if seed == -1:
        seed = _random_seed()
    seed = _int("seed", seed, 0, MAX_SEED - limits.max_batch_size * limits.max_n_iter)
    settings = {**options, **request_settings(req, facts, options, models)}
    params = dict(prompt=prompts, negative_prompt=negative, steps=steps, sampler=spec.name, schedule=schedule,
                  cfg_scale=_finite("cfg_scale", req.cfg_scale if req.cfg_scale is not None else 7.0, 0.0, 100.0),
                  width=size["width"], height=size["height"], seed=seed, batch_size=batch_size, n_iter=n_iter,
                  eta=eta, s_noise=_finite("s_noise", req.s_noise if req.s_noise is not None else 1.0, 0.0, 10.0),
                  clip_skip=settings["CLIP_stop_at_last_layers"], seamless=bool(req.tiling))
    if settings.get("sd_vae_decode_method") == "TAESD":  # A1111's setting: the model's TAESD decodes the images
        params["decoder"] = "TAESD"
    strength = _finite("subseed_strength", req.subseed_strength or 0.0, 0.0, 1.0)
    if strength:
        subseed = req.subseed if req.subseed not in (None, -1) else _random_seed()
        params.update(subseed=_int("subseed", subseed, 0, MAX_SEED - limits.max_batch_size * limits.max_n_iter),
                      subseed_strength=strength)
    if (req.seed_resize_from_w or 0) > 0 and (req.seed_resize_from_h or 0) > 0:
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            v = getattr(req, name)
            if v % unit or v > limits.max_size:
                raise RequestError(f"{name} must be a multiple of {unit} up to {limits.max_size}, got {v}")
        params["seed_resize_from"] = (req.seed_resize_from_w, req.seed_resize_from_h)
    if mode == "txt2img":
        if req.enable_hr:
            _hires(req, params, limits, unit, facts, upscalers)
    else:
        _img2img(req, params, limits)
    params.update(alwayson(req, mode, params, limits, controlnets))  # before the script: its runs use the units
    plan = _script(req, mode, params, limits, facts, models, upscalers)
    params.update(_refiner(req, models))
    job = Job(mode, params, model=settings.get("sd_model_checkpoint"),
              save=bool(req.save_images or save_default) and settings["samples_save"],
              save_as=(settings["samples_format"], settings["jpeg_quality"]), styles=list(req.styles or []),
              script=plan)
    if req.force_task_id:
        job.id = _task_id(req.force_task_id)
    return job


def _prompts(req, limits, styles, batch_size):
    """The prompts (one, or one per image of a batch) and the negative prompt, with the request's styles applied
    (A1111 applies them to every prompt of the batch, and to the negative prompt)."""
    prompts, negative = req.prompt, req.negative_prompt or ""
    if isinstance(prompts, list):
        if not prompts:
            raise RequestError("prompt: an empty list")
        if len(prompts) != batch_size:
            raise RequestError(f"a list of prompts needs one per image of a batch ({batch_size}), got {len(prompts)}")
    if sum(map(len, prompts if isinstance(prompts, list) else [prompts])) + len(negative) > limits.max_prompt_chars:
        raise RequestError(f"the prompts are longer than the server's limit of {limits.max_prompt_chars} characters")
    if req.styles:
        styles = styles or StyleTable()
        try:
            if isinstance(prompts, list):
                prompts = [styles.apply(req.styles, p, "")[0] for p in prompts]
                negative = styles.apply(req.styles, "", negative)[1]
            else:
                prompts, negative = styles.apply(req.styles, prompts, negative)
        except KilnError as e:
            raise RequestError(f"styles: {e}") from None
    return prompts, negative


def request_settings(req, facts, options: dict, models) -> dict:
    """The request's `override_settings`, checked as POST /options checks them (an unknown model: 422)."""
    chosen = models.find(options["sd_model_checkpoint"]) if models and options.get("sd_model_checkpoint") else None
    ctx = Context(facts, models, chosen.sha256 if chosen else None, unknown_model_status=422)
    return validate(req.override_settings or {}, ctx, "override_settings")


_TASK_ID = re.compile(r"[A-Za-z0-9_().:-]{1,64}")


def _task_id(value: str) -> str:
    if not _TASK_ID.fullmatch(value):
        raise RequestError("force_task_id must be 1 to 64 letters, digits or _ ( ) . : -")
    return value


def _script(req: GenerationRequest, mode: str, params: dict, limits: Limits, facts, models, upscalers=None):
    """The request's A1111 script, checked and planned (`kiln.scripts`), or None."""
    from ..pipeline import GenerationParams
    from .. import scripts

    if not req.script_name:
        if req.script_args:
            raise RequestError("script_args: given without a script_name")
        return None

    def find_model(name):
        entry = models.find(name) if models is not None and isinstance(name, str) else None
        return entry.title if entry is not None else None

    bounds = scripts.Bounds(max_steps=limits.max_steps, max_size=limits.max_size,
                            max_batch_size=limits.max_batch_size, max_n_iter=limits.max_n_iter,
                            max_images=limits.max_batch_size * limits.max_n_iter,
                            max_pixels=limits.max_image_pixels)
    env = scripts.Env(mode, facts.native_size, facts.size_unit, facts.clip_layers, bounds, find_model,
                      seed_random=req.seed in (None, -1), upscalers=upscalers, upscaler_files=False)
    try:
        return scripts.prepare(req.script_name, req.script_args, GenerationParams.make(**params), env)
    except KilnError as e:
        raise RequestError(f"{req.script_name}: {e}" if not str(e).startswith("Script '") else str(e)) from None


NO_REFINER = (None, "", "None", "none")


def _refiner(req, models) -> dict:
    """{"refiner": (model title, switch)} for A1111's refiner_checkpoint/refiner_switch_at; {} without one (A1111
    ignores the switch then). The worker checks on loading that the refiner shares the model's latent space."""
    if req.refiner_checkpoint in NO_REFINER:
        return {}
    entry = models.find(req.refiner_checkpoint) if models is not None else None
    if entry is None:
        raise RequestError(f"refiner_checkpoint: unknown model {req.refiner_checkpoint!r}; GET /sdapi/v1/sd-models "
                           "lists them")
    switch = _finite("refiner_switch_at", req.refiner_switch_at if req.refiner_switch_at is not None else 0.8,
                     0.0, 1.0)
    return {"refiner": (entry.title, switch)}


def hires_upscaler(value: str | None, upscalers) -> str:
    """`hr_upscaler` as `GenerationParams.hires_upscaler`: A1111's latent modes are kiln's latent upscale (None:
    Latent, A1111's default); the others by name from the server's upscalers (`kiln.pipeline.upscalers`)."""
    raw = (value or "Latent").strip()
    key = raw.lower()
    if key.startswith("latent") or key == "none":
        return "latent"
    if key in ("lanczos", "nearest") or upscalers is None:
        if key not in ("lanczos", "nearest"):
            raise RequestError(f"hr_upscaler {value!r} is not available; use Latent, Lanczos or Nearest")
        return key
    try:
        return upscalers.canonical(raw, paths=False)
    except KilnError as e:
        raise RequestError(f"hr_upscaler: {e}") from None


def _hires(req, params, limits, unit, facts, upscalers):
    w, h = params["width"] or facts.native_size, params["height"] or facts.native_size
    if (req.hr_resize_x or 0) > 0 or (req.hr_resize_y or 0) > 0:
        rx, ry = req.hr_resize_x or 0, req.hr_resize_y or 0
        scale = max(rx / w if rx else 0, ry / h if ry else 0)
    else:
        scale = _finite("hr_scale", req.hr_scale if req.hr_scale is not None else 2.0, 1.0, 8.0)
    big = (int(w * scale) // unit * unit, int(h * scale) // unit * unit)
    if max(big) > limits.max_size:
        raise RequestError(f"the hires size {big[0]}x{big[1]} exceeds the server's limit of {limits.max_size}")
    upscaler = hires_upscaler(req.hr_upscaler, upscalers)
    strength = _finite("denoising_strength", req.denoising_strength if req.denoising_strength is not None else 0.7,
                       0.0, 1.0)
    steps = _int("hr_second_pass_steps", req.hr_second_pass_steps or 0, 0, limits.max_steps)
    params.update(hires_scale=scale, hires_upscaler=upscaler, hires_steps=steps or None,
                  hires_strength=strength)


def _img2img(req: Img2ImgRequest, params, limits):
    if not req.init_images:
        raise RequestError("init_images: at least one image is needed", 422)
    if len(req.init_images) > 1:  # A1111 would make a batch of them: one image each
        raise RequestError(f"init_images: kiln takes one init image per request, got {len(req.init_images)}")
    init = decode_image(req.init_images[0], limits, "init_images[0]")
    if req.resize_mode not in RESIZE:
        raise RequestError(f"resize_mode must be 0, 1, 2 or 3, got {req.resize_mode}")
    params.update(init_image=init, resize_mode=RESIZE[req.resize_mode],
                  strength=_finite("denoising_strength",
                                   req.denoising_strength if req.denoising_strength is not None else 0.75, 0.0, 1.0))
    if req.mask:
        from PIL import ImageOps

        mask = decode_image(req.mask, limits, "mask")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))
        if req.inpainting_fill not in FILL:
            raise RequestError(f"inpainting_fill must be 0, 1, 2 or 3, got {req.inpainting_fill}")
        blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x or 0, req.mask_blur_y or 0)
        padding = _int("inpaint_full_res_padding", req.inpaint_full_res_padding or 0, 0, limits.max_size)
        params.update(mask=mask, mask_blur=_finite("mask_blur", blur, 0.0, 256.0),
                      inpaint_fill=FILL[req.inpainting_fill],
                      inpaint_area="masked" if req.inpaint_full_res else "whole", masked_padding=padding)
        if req.inpaint_full_res and params["width"] and params["height"]:
            # A1111 fits the picture to width x height first, then renders the crop around the mask at that size
            from ..images import fit, load_image, load_mask

            try:
                init_rgb = load_image(init, "init image")
                m = load_mask(mask, init_rgb.size)
            except KilnError as e:
                raise RequestError(str(e)) from None
            params["init_image"] = fit(init_rgb, params["width"], params["height"], params["resize_mode"])
            params["mask"] = fit(Image.fromarray((m * 255).astype("uint8")).convert("RGB"), params["width"],
                                 params["height"], params["resize_mode"])


def echo_parameters(req: Txt2ImgRequest) -> dict:
    """The request as A1111 echoes it: with defaults filled in, init images and mask left out."""
    d = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        d["init_images"], d["mask"] = None, None
    return d


def info_json(job: Job, req: Txt2ImgRequest, facts, model_title: str | None) -> dict:
    """A1111's `Processed.js()`: the JSON string clients read from `info`."""
    from .. import __version__
    from .controlnet import infotext_units

    p = job.params
    rp = job.result_params or {}
    spec = SAMPLERS[p["sampler"]]
    prompts = job.prompts or ([p["prompt"]] if isinstance(p["prompt"], str) else list(p["prompt"]))
    seeds = job.seeds or [p["seed"]]
    return {
        "prompt": prompts[0] if prompts else "", "all_prompts": prompts,
        "negative_prompt": p["negative_prompt"], "all_negative_prompts": [p["negative_prompt"]] * len(prompts),
        "seed": seeds[0], "all_seeds": seeds,
        "subseed": p.get("subseed", -1), "all_subseeds": [p.get("subseed", -1) + i if p.get("subseed") is not None
                                                           else -1 for i in range(len(seeds))],
        "subseed_strength": p.get("subseed_strength", 0), "width": rp.get("width", p["width"]),
        "height": rp.get("height", p["height"]), "sampler_name": spec.label, "cfg_scale": p["cfg_scale"],
        "steps": p["steps"], "batch_size": p["batch_size"], "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": facts.name, "sd_model_hash": facts.hash,
        "sd_model_title": model_title, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": (p.get("seed_resize_from") or (-1, -1))[0],
        "seed_resize_from_h": (p.get("seed_resize_from") or (-1, -1))[1],
        "denoising_strength": p.get("strength", p.get("hires_strength")),
        "extra_generation_params": infotext_units(job.infotexts[job.grids] if len(job.infotexts) > job.grids
                                                  else None),
        "index_of_first_image": job.grids, "infotexts": job.infotexts, "styles": req.styles or [],
        "job_timestamp": _timestamp(job.created), "clip_skip": p["clip_skip"],
        "is_using_inpainting_conditioning": facts.inpainting,
        "version": f"kiln {__version__}", "kiln_job_id": job.id, "kiln_state": job.state,
    }


def _timestamp(t: float) -> str:
    import time

    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))
