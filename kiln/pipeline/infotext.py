"""A1111's PNG "parameters" text: write it exactly as A1111 does, read it back (ours and other tools').

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: …

Values with a comma, colon or newline are JSON-quoted (A1111's `quote`); the last line holds the parameters
when it has at least three `key: value` pairs (A1111's `parse_generation_parameters`).
"""
from __future__ import annotations

import json
import re

from .. import __version__
from ..samplers import SAMPLERS, resolve
from ..samplers.schedules import SCHEDULE_LABELS
from .params import hires_upscaler_key

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _num(v: float) -> str:
    """Numbers as A1111 prints them: 7.0 → 7, 7.5 → 7.5."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_infotext(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The text A1111 writes: prompt, optional negative prompt line, then `key: value` pairs (None dropped)."""
    params = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params}".strip()


def generation_fields(params: dict, seed: int, model_name: str | None = None, model_hash: str | None = None,
                      vae_name: str | None = None, vae_hash: str | None = None, extra: dict | None = None) -> dict:
    """Our generation parameters as A1111's infotext fields (plus kiln's own keys)."""
    spec = SAMPLERS[params["sampler"]]
    default_eta = spec.eta or 0.0
    fields = {
        "Steps": params["steps"],
        "Sampler": spec.label,
        # DDIM/PLMS: absent for CompVis' uniform timesteps, unless a model default says otherwise (recorded_schedule)
        "Schedule type": SCHEDULE_LABELS[params["schedule"]] if params.get("schedule") else None,
        "CFG scale": _num(float(params["cfg_scale"])),
        "Seed": seed,
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Clip skip": params.get("clip_skip") if params.get("clip_skip", 1) > 1 else None,
        "Eta": _num(float(params["eta"])) if spec.eta is not None and params.get("eta", default_eta) != default_eta
        else None,
        "Sigma noise": _num(float(params["s_noise"])) if params.get("s_noise", 1.0) != 1.0 else None,
        **(extra or {}),
        "Precision": params.get("precision"),
        "EMA": {True: "on", False: "off"}.get(params.get("ema")),
        "Version": f"kiln {__version__}",
    }
    return fields


def parse_infotext(text: str) -> dict:
    """{'prompt', 'negative_prompt', and every `key: value` field as a string}; sizes split as A1111 does."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    res = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for k, v in _PARAM.findall(last):
        v = unquote(v.strip()) if v.strip().startswith('"') else v.strip()
        m = _SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        res[k] = v
    return res


def params_from_infotext(info: dict) -> dict:
    """`GenerationParams` fields (and the image's "batch_pos") that regenerate an image from its parsed
    infotext."""
    out = {"prompt": info.get("prompt", ""), "negative_prompt": info.get("negative_prompt", "")}
    try:
        if "Steps" in info:
            out["steps"] = int(info["Steps"])
        if "Sampler" in info:
            spec, sched = resolve(info["Sampler"], info.get("Schedule type"), lenient=True)
            out["sampler"], out["schedule"] = spec.name, sched
        if "CFG scale" in info:
            out["cfg_scale"] = float(info["CFG scale"])
        if "Seed" in info:
            out["seed"] = int(info["Seed"])
        if "Size-1" in info:
            out["width"], out["height"] = int(info["Size-1"]), int(info["Size-2"])
        if "Clip skip" in info:
            out["clip_skip"] = int(info["Clip skip"])
        if "Eta" in info:
            out["eta"] = float(info["Eta"])
        if "Sigma noise" in info:
            out["s_noise"] = float(info["Sigma noise"])
        if "Variation seed" in info:
            out["subseed"] = int(info["Variation seed"])
            out["subseed_strength"] = float(info.get("Variation seed strength", 0))
        if "Seed resize from-1" in info:
            out["seed_resize_from"] = (int(info["Seed resize from-1"]), int(info["Seed resize from-2"]))
        if info.get("Tiling") == "True":
            out["seamless"] = True
        if "Hires upscale" in info:
            out["hires_scale"] = float(info["Hires upscale"])
            out["hires_steps"] = int(info["Hires steps"]) if info.get("Hires steps", "None") != "None" else None
            out["hires_upscaler"] = hires_upscaler_key(info.get("Hires upscaler", "Latent"))
            out["hires_strength"] = float(info.get("Denoising strength", 0.7))
        if "Denoising strength" in info and "Hires upscale" not in info:  # img2img's
            out["strength"] = float(info["Denoising strength"])
        if info.get("VAE Decoder", "Full") != "Full":  # A1111's TAESD final decode
            out["decoder"] = info["VAE Decoder"]
        if "Batch size" in info:
            out["batch_size"], out["batch_pos"] = int(info["Batch size"]), int(info.get("Batch pos", 0))
    except ValueError as e:
        raise ValueError(f"the image's parameters cannot be used: {e}") from None
    return out

