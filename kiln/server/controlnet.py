"""ControlNet through the API, as sd-webui-controlnet (Mikubill/sd-webui-controlnet, API version 2) defines it:
`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` in txt2img / img2img requests (A1111's and the job
API's), its `/controlnet/*` endpoints, and the folder of ControlNet files it names "name [8-hex legacy hash]".

A unit's fields are sorted as the request's are (`fields.py`): honoured; no effect (accepted with any value);
refused unless a no-op (422 naming the field and why); a field sd-webui-controlnet does not have: 422 naming it.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends

from .. import preprocessors
from ..checkpoints.controlnet_index import ControlNetIndex
from ..errors import KilnError
from .context import RequestError, Server, server

NO_MODEL = (None, "", "None", "none")
MAX_UNITS = 8  # units per request: each runs a ControlNet as large as a third of the UNet at every step
API_VERSION = 2  # sd-webui-controlnet's external_code.get_api_version()


def index_for(config) -> ControlNetIndex:
    """The server's ControlNets: `--controlnet-dir` (or models/ControlNet), and the embedded demo ControlNet when the
    server runs the embedded demo model."""
    from ..demo.control_report import EMBEDDED_CONTROLNET
    from ..demo.report import EMBEDDED

    demo = config.ckpt is None or Path(config.ckpt).resolve() == EMBEDDED
    return ControlNetIndex.for_config(config.controlnet_dir, [EMBEDDED_CONTROLNET] if demo else [])


# ------------------------------------------------------------------------------------------------ units in requests
ALIASES = {"input_image": "image", "mask_image": "mask", "guidance": "guidance_end", "lowvram": "low_vram",
           "guess_mode": "guessmode"}  # sd-webui-controlnet's older names
HONOURED = ("enabled", "image", "mask", "module", "model", "weight", "guidance_start", "guidance_end",
            "control_mode", "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
NO_EFFECT = {
    "low_vram": "moves the ControlNet between devices to save memory; kiln keeps it with the model",
    "is_ui": "marks units made by sd-webui-controlnet's UI",
}
# (accepted values, why anything else is refused)
REFUSED = {
    "guessmode": ((None, False, 0), "guess mode was removed in sd-webui-controlnet 1.1.136: use control_mode"),
    "hr_option": ((None, "Both", "both", 0), "with the hires fix, kiln's units act in both passes"),
    "save_detected_map": ((None, False), "kiln does not add the detected maps to the images; "
                                         "POST /controlnet/detect makes them"),
    "inpaint_crop_input_image": ((None, False), "for 'only masked' inpainting kiln fits the whole control image "
                                                "to the crop, it does not crop it to the mask"),
    "advanced_weighting": ((None,), "per-layer weights are not supported"),
    "effective_region_mask": ((None, ""), "restricting a unit to a region is not supported"),
    "ipadapter_input": ((None,), "IP-Adapter is not supported"),
    "pulid_mode": ((None, "Fidelity"), "PuLID is not supported"),
    "input_mode": ((None, "simple"), "batch input is sd-webui-controlnet's UI's"),
    "batch_images": ((None, ""), "batch input is sd-webui-controlnet's UI's"),
    "output_dir": ((None, ""), "batch input is sd-webui-controlnet's UI's"),
    "loopback": ((None, False), "loopback is sd-webui-controlnet's UI's"),
}
KNOWN = set(HONOURED) | set(NO_EFFECT) | set(REFUSED)


def _noop(value, accepted) -> bool:
    return any(value is a or value == a and type(value) is not bool for a in accepted)


def alwayson(req, mode: str, params: dict, limits, index: ControlNetIndex | None) -> dict:
    """{"controlnets": [ControlUnit, ...]} for the request's `alwayson_scripts` ({} without units); any other
    always-on script is refused, as kiln has none of them."""
    units = []
    for name, value in (req.alwayson_scripts or {}).items():
        if name.strip().lower() != "controlnet":  # A1111 matches script titles in any case
            raise RequestError(f"alwayson_scripts: {name!r} is not available (kiln's only always-on script is "
                               "ControlNet)")
        units = _units(value, name, mode, params, limits, index, hires=bool(getattr(req, "enable_hr", False)),
                       only_masked=mode == "img2img" and bool(req.mask) and req.inpaint_full_res is not False)
    return {"controlnets": units} if units else {}


def _units(value, name, mode, params, limits, index, hires: bool, only_masked: bool) -> list:
    where = f"alwayson_scripts.{name}"
    if not isinstance(value, dict) or set(value) - {"args"}:
        raise RequestError(f"{where}: expected {{\"args\": [unit, ...]}}, got {_short(value)}")
    args = value.get("args") or []
    if not isinstance(args, list):
        raise RequestError(f"{where}.args: expected a list of ControlNet units, got {_short(args)}")
    units = []
    for k, d in enumerate(args):
        unit = _unit(d, f"{where}.args[{k}]", mode, params, limits, index, hires, only_masked)
        if unit is not None:
            units.append(unit)
    if len(units) > MAX_UNITS:
        raise RequestError(f"{where}: {len(units)} enabled units; the server runs at most {MAX_UNITS}")
    for k, u in enumerate(units):
        try:
            u.check(k)  # start < end, the weight's range, the control mode's name
        except KilnError as e:
            raise RequestError(f"{where}: {e}") from None
    return units


def _canonical(d: dict, where: str) -> dict:
    out = {}
    for key, value in d.items():
        new = ALIASES.get(key, key)
        if new in out:
            raise RequestError(f"{where}: both {key!r} and {new!r} given (the first is another name of the second)")
        out[new] = value
    unknown = sorted(set(out) - KNOWN)
    if unknown:
        raise RequestError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not "
                           "part of sd-webui-controlnet's unit")
    return out


def _unit(d, where: str, mode, params, limits, index, hires: bool, only_masked: bool):
    """One unit of the request as a `ControlUnit` (None when disabled), or a 422 naming the field."""
    from ..pipeline.control import ControlUnit

    if not isinstance(d, dict):
        raise RequestError(f"{where}: a ControlNet unit is an object, got {_short(d)}")
    d = _canonical(d, where)
    if not _flag(d.get("enabled", True), f"{where}.enabled"):  # API version 2: a unit is on unless disabled
        return None
    refused = {k: v for k, v in d.items() if k in REFUSED and not _noop(v, REFUSED[k][0])}
    if not hires:
        refused.pop("hr_option", None)  # sd-webui-controlnet ignores it without the hires fix
    if not only_masked:
        refused.pop("inpaint_crop_input_image", None)  # …and this one but for "only masked" inpainting
    if refused:
        name = next(iter(refused))
        raise RequestError(f"{where}.{name}: {REFUSED[name][1]} (accepted: "
                           f"{' or '.join('null' if a is None else repr(a) for a in REFUSED[name][0])}, got "
                           f"{_short(refused[name])})")
    try:
        module = preprocessors.find(d.get("module"))
    except KilnError as e:
        raise RequestError(f"{where}.module: {e}") from None
    model = d.get("model")
    if model in NO_MODEL:
        raise RequestError(f"{where}.model: an enabled unit needs a ControlNet model; GET /controlnet/model_list "
                           "lists them")
    entry = index.find(model) if index is not None else None
    if entry is None:
        raise RequestError(f"{where}.model: unknown ControlNet model {model!r}; GET /controlnet/model_list lists "
                           "them")
    try:
        resize = preprocessors.resize_mode(d.get("resize_mode", "Crop and Resize"))
    except KilnError as e:
        raise RequestError(f"{where}.{e}") from None
    pixel_perfect = _flag(d.get("pixel_perfect", False), f"{where}.pixel_perfect")
    image, mask = _image(d, where, limits, mode, params, module)
    return ControlUnit(
        model=entry.path, image=image, mask=mask, resize_mode=resize,
        weight=_number(d, "weight", 1.0, where), start=_number(d, "guidance_start", 0.0, where),
        end=_number(d, "guidance_end", 1.0, where), module=module.name,
        processor_res=None if pixel_perfect else _resolution(d.get("processor_res"), f"{where}.processor_res"),
        threshold_a=_threshold(d.get("threshold_a"), module, 0, f"{where}.threshold_a"),
        threshold_b=_threshold(d.get("threshold_b"), module, 1, f"{where}.threshold_b"),
        control_mode=d.get("control_mode", "Balanced"))


def _image(d: dict, where: str, limits, mode: str, params: dict, module):
    """(The unit's control image, its mask or None) from base64, {"image", "mask"} or [image, mask]; in img2img
    without an image, the init image, as sd-webui-controlnet takes it (inpaint units: with the img2img mask, which
    the pipeline uses for a unit without its own)."""
    from .schemas import decode_image

    image, mask = d.get("image"), d.get("mask")
    if isinstance(image, dict):
        extra = set(image) - {"image", "mask"}
        if extra:
            raise RequestError(f"{where}.image: unknown field{'s' if len(extra) > 1 else ''} "
                               f"{', '.join(sorted(extra))} (an image object has image and mask)")
        image, mask = image.get("image"), image.get("mask") if image.get("mask") not in (None, "") else mask
    elif isinstance(image, (list, tuple)):
        if len(image) != 2 or not all(isinstance(x, (str, type(None))) for x in image):
            raise RequestError(f"{where}.image: one image per unit: a base64 string, {{\"image\", \"mask\"}} or "
                               "[image, mask]")
        image, mask = image[0], image[1] if image[1] not in (None, "") else mask
    if mask not in (None, ""):
        if not isinstance(mask, str):
            raise RequestError(f"{where}.mask: expected a base64 image, got {_short(mask)}")
        mask = decode_image(mask, limits, f"{where}.mask")
    else:
        mask = None
    if image in (None, ""):
        if mode != "img2img":
            raise RequestError(f"{where}.image: no control image (image or input_image); txt2img has no init "
                               "image to fall back on")
        return params["init_image"], mask
    if not isinstance(image, str):
        raise RequestError(f"{where}.image: expected a base64 image, got {_short(image)}")
    return decode_image(image, limits, f"{where}.image").convert("RGB"), mask


def _flag(v, name: str) -> bool:
    if v is None or isinstance(v, bool):
        return bool(v)
    raise RequestError(f"{name}: expected true or false, got {_short(v)}")


def _number(d: dict, key: str, default: float, where: str) -> float:
    v = d.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{where}.{key}: expected a number, got {_short(v)}")
    return float(v)


def _resolution(v, name: str) -> int:
    """processor_res: -1 (sd-webui-controlnet's "unset") or none is its default, 512."""
    if v is None or v == -1:
        return 512
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 64 <= v <= 16384:
        raise RequestError(f"{name}: expected a whole number of pixels in 64..16384 (or -1), got {_short(v)}")
    return int(v)


def _threshold(v, module, index: int, name: str) -> float | None:
    """threshold_a (index 0) or threshold_b: None or -1 is the slider's default. A module without that slider
    takes any value and no notice of it, as sd-webui-controlnet (clients such as webuiapi always send 64)."""
    if index >= len(module.sliders) or v is None or v == -1:
        return None
    slider = module.sliders[index]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not slider.min <= v <= slider.max:
        raise RequestError(f"{name}: {slider.name} of {module.name} must be in {slider.min:g}..{slider.max:g}, "
                           f"got {_short(v)}")
    return float(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"a {type(v).__name__}"


def public_units(units: list) -> list[dict]:
    """A job's units without their images (the job API's `params`)."""
    return [{"model": Path(u.model).stem if isinstance(u.model, (str, Path)) else getattr(u.model, "name", None),
             "module": u.module, "weight": u.weight, "guidance_start": u.start, "guidance_end": u.end,
             "resize_mode": u.resize_mode, "processor_res": u.processor_res, "threshold_a": u.threshold_a,
             "threshold_b": u.threshold_b, "control_mode": u.control_mode} for u in units]


def infotext_units(infotext: str | None) -> dict:
    """{"ControlNet 0": "Module: …", …} from an infotext: what sd-webui-controlnet puts in A1111's
    `extra_generation_params`."""
    if not infotext:
        return {}
    from ..pipeline.infotext import parse_infotext

    return {k: v for k, v in parse_infotext(infotext).items() if k.startswith("ControlNet ")}


# -------------------------------------------------------------------------------------------------------- endpoints
router = APIRouter(prefix="/controlnet", tags=["ControlNet"])


@router.get("/version")
def version():
    return {"version": API_VERSION}


@router.get("/model_list")
def model_list(update: bool = True, s: Server = Depends(server)):
    """The ControlNet files of --controlnet-dir as "name [hash]", "None" first as sd-webui-controlnet lists them;
    `update` (default true) reads the folder again."""
    if update:
        s.controlnets.refresh()
    return {"model_list": ["None", *s.controlnets.titles()]}


@router.get("/module_list")
def module_list(alias_names: bool = False):
    """The preprocessors kiln runs (no weights needed), with their sliders; `alias_names`: their UI labels."""
    out = preprocessors.module_list()
    if not alias_names:
        return out
    label = {m.name: m.label for m in preprocessors.MODULES.values()}
    return {"module_list": [label[n] for n in out["module_list"]],
            "module_detail": {label[n]: v for n, v in out["module_detail"].items()}}


@router.get("/settings")
def settings():
    return {"control_net_unit_count": MAX_UNITS}


DETECT = ("controlnet_module", "controlnet_input_images", "controlnet_images", "controlnet_processor_res",
          "controlnet_threshold_a", "controlnet_threshold_b", "controlnet_masks", "low_vram")


@router.post("/detect")
def detect(body: dict[str, Any] = Body(..., examples=[{"controlnet_module": "canny",
                                                        "controlnet_input_images": ["<base64 PNG>"],
                                                        "controlnet_processor_res": 512,
                                                        "controlnet_threshold_a": 100,
                                                        "controlnet_threshold_b": 200}]),
           s: Server = Depends(server)):
    """Run a preprocessor on images: {"images": [base64 PNG, ...], "info": "Success"}. `controlnet_images` (what
    webuiapi sends) is taken for `controlnet_input_images`."""
    from ..output import png_bytes
    from .schemas import decode_image

    unknown = sorted(set(body) - set(DETECT))
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not part of "
                           "sd-webui-controlnet's detect request")
    if "controlnet_images" in body and "controlnet_input_images" in body:
        raise RequestError("both controlnet_images and controlnet_input_images given")
    images = body.get("controlnet_input_images", body.get("controlnet_images")) or []
    if not isinstance(images, list) or not images:
        raise RequestError("controlnet_input_images: no image given")
    if body.get("controlnet_masks"):
        raise RequestError("controlnet_masks: masks are not supported (kiln's inpaint preprocessors pass the image "
                           "through)")
    try:
        module = preprocessors.find(body.get("controlnet_module", "none"))
    except KilnError as e:
        raise RequestError(f"controlnet_module: {e}") from None
    res = _resolution(body.get("controlnet_processor_res"), "controlnet_processor_res")
    a, b = (_threshold(body.get(f"controlnet_threshold_{x}"), module, i, f"controlnet_threshold_{x}")
            for i, x in enumerate("ab"))
    out = []
    for k, data in enumerate(images):
        image = decode_image(data, s.limits, f"controlnet_input_images[{k}]")
        try:
            result = preprocessors.run(module.name, image.convert("RGB"), res, a, b)
        except KilnError as e:
            raise RequestError(str(e)) from None
        out.append(base64.b64encode(png_bytes(result)).decode("ascii"))
    return {"images": out, "info": "Success"}
