"""A1111's settings (`GET/POST /sdapi/v1/options`, a request's `override_settings`): the ones kiln has, each
checked, stored and honoured, or refused with the reason. No option names a server path or a file name: kiln
makes every output name itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from .context import RequestError

FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}  # A1111's spellings → kiln's file type


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable  # (value, context) → the value to store, or raises RequestError
    what: str  # docs/server.md's line


def _bool(name):
    def check(v, ctx):
        if not isinstance(v, bool):
            raise RequestError(f"{name} must be true or false, got {v!r}")
        return v
    return check


def _only(name, allowed, why):
    def check(v, ctx):
        if v not in allowed:
            raise RequestError(f"{name} {v!r} is not supported: {why}")
        return v
    return check


def _clip_skip(v, ctx):
    layers = ctx.facts.clip_layers
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= layers:
        raise RequestError(f"CLIP_stop_at_last_layers must be an integer from 1 to {layers}, got {v!r}")
    return v


def _format(v, ctx):
    if not isinstance(v, str) or v.lower() not in FORMATS:
        raise RequestError(f"samples_format must be png, jpg or webp, got {v!r}")
    return v.lower()


def _quality(v, ctx):
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100:
        raise RequestError(f"jpeg_quality must be an integer from 1 to 100, got {v!r}")
    return v


def _model(v, ctx):
    if not isinstance(v, str) or ctx.models is None or ctx.models.find(v) is None:
        raise RequestError(f"unknown model {v!r}; GET /sdapi/v1/sd-models lists them", ctx.unknown_model_status)
    return ctx.models.find(v).title


def _hash(v, ctx):
    if v != ctx.current_hash:
        raise RequestError("sd_checkpoint_hash is the loaded model's hash, not a setting: choose a model with "
                           "sd_model_checkpoint")
    return v


def _decode_method(v, ctx):
    if v not in ("Full", "TAESD"):
        raise RequestError(f"sd_vae_decode_method must be Full or TAESD, got {v!r}")
    if v == "TAESD" and not getattr(ctx.facts, "taesd", False):
        raise RequestError("sd_vae_decode_method TAESD: the server has no TAESD decoder for this model "
                           "(taesd_decoder.* or taesdxl_decoder.* in --vae-approx-dir, default models/VAE-approx)")
    return v


OPTIONS = {
    "sd_model_checkpoint": Option(None, _model, "the model jobs run on (by title, file name, name or hash); "
                                  "setting it loads the model, queued behind running jobs"),
    "sd_checkpoint_hash": Option(None, _hash, "read-only: the SHA-256 of the chosen model"),
    "CLIP_stop_at_last_layers": Option(1, _clip_skip, "clip skip"),
    "samples_save": Option(True, _bool("samples_save"), "false: nothing is saved, whatever a request says"),
    "samples_format": Option("png", _format, "png, jpg or webp: the files saved under --outdir (JPEG and WebP "
                             "carry the infotext in EXIF UserComment, as A1111 writes it)"),
    "jpeg_quality": Option(80, _quality, "1–100: the quality of saved JPEG and WebP files"),
    "send_seed": Option(True, _bool("send_seed"), "A1111's UI setting (send the seed along when sending a "
                        "picture to another tab): stored for the clients that read it, no effect on generation"),
    "return_grid": Option(False, _only("return_grid", (False,), "responses hold the images only, never a grid"),
                          "false only"),
    "eta_noise_seed_delta": Option(0, _only("eta_noise_seed_delta", (0,), "kiln does not offset the seed of "
                                            "ancestral samplers' noise (ENSD)"), "0 only"),
    "sd_vae": Option("Automatic", _only("sd_vae", ("Automatic", "None"), "jobs use the checkpoint's own VAE"),
                     "Automatic (or None): the checkpoint's own VAE"),
    "sd_vae_decode_method": Option("Full", _decode_method, "Full (the model's VAE) or TAESD: the final images "
                                   "decoded by the model's TAESD decoder from --vae-approx-dir (default "
                                   "models/VAE-approx); the infotext records VAE Decoder: TAESD, as A1111's"),
    "randn_source": Option("CPU", _only("randn_source", ("CPU",), "kiln draws its noise on the CPU, as A1111's "
                                        "'CPU' source, so seeds give the same images on every device"), "CPU only"),
}


def defaults() -> dict:
    return {k: o.default for k, o in OPTIONS.items() if o.default is not None}


def names_a_path(key: str) -> bool:
    """Settings that would let a client choose where files go or what they are called (A1111's outdir_*,
    *_dir, *_path, filename patterns): never taken from a request."""
    k = key.lower()
    return k.startswith("outdir") or any(w in k for w in ("dir", "path", "filename", "file_name", "folder"))


@dataclass
class Context:
    facts: Any
    models: Any = None
    current_hash: str | None = None
    unknown_model_status: int = 404  # POST /options: 404 as for a missing resource; in a request body: 422


def validate(settings: dict, ctx: Context, where: str = "options") -> dict:
    """The settings checked as one: unknown keys and path settings refused together, naming them."""
    if not isinstance(settings, dict):
        raise RequestError(f"{where} must be an object of settings")
    paths = sorted(k for k in settings if names_a_path(k))
    if paths:
        raise RequestError(f"{where}: {', '.join(paths)} would set a server path or file name; kiln makes every "
                           "output name itself and takes none from a client")
    unknown = sorted(k for k in settings if k not in OPTIONS)
    if unknown:
        raise RequestError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"kiln's settings are {', '.join(OPTIONS)} (docs/server.md)")
    return {k: OPTIONS[k].check(v, ctx) for k, v in settings.items()}
