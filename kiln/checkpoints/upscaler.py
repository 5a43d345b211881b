"""Upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, DAT...) as ready networks: `load_upscaler(path)`.

A file is `.safetensors`, or a `.pth`/`.pt`/`.ckpt` pickle read by kiln's restricted unpickler (never the plain one:
these files come from model sites). Training frameworks wrap the weights (`params_ema`, `params`, `state_dict`,
`model`, `net`) and prefix them (`module.`, `netG.`); those wrappers are removed as spandrel does, then the
architecture and its sizes are read off the tensor names and shapes (`upscaler_detect`). Every failure is one
`CheckpointError` line that names the file."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.upscalers import SRModule
from .safe_pickle import load_pickle_checkpoint
from .sources import TensorSource, open_safetensors
from .upscaler_detect import ARCHITECTURES

__all__ = ["SUFFIXES", "load_upscaler", "upscaler_arch"]

SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
# The containers training code saves the weights in, tried in spandrel's order (`params_ema` before `params`: the
# averaged weights are the ones released), and the prefixes of DataParallel and of BasicSR's generator.
WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
PREFIXES = ("module.", "netG.")


def _unwrap(obj: dict) -> dict:
    for key in WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if len(obj) == 1 and isinstance(single := next(iter(obj.values())), dict):
        obj = single
    return obj


def _flatten(obj: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested dict under dotted names (nested dicts show what a foreign file is, e.g. an embedding)."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _strip_prefixes(src: TensorSource) -> TensorSource:
    for prefix in PREFIXES:
        keys = list(src.keys())
        if keys and all(k.startswith(prefix) for k in keys):
            src = src.renamed({k[len(prefix):]: k for k in keys})
    return src


def open_upscaler_file(path) -> TensorSource:
    """The file's tensors, unwrapped and unprefixed, by name (safetensors: read lazily)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"upscaler {path}: {'is a folder' if path.is_dir() else 'no such file'}")
    if path.suffix.lower() not in SUFFIXES:
        raise CheckpointError(f"upscaler {path}: not an upscaler file type ({path.suffix or 'no suffix'}); expected "
                              f"one of {', '.join(SUFFIXES)}")
    if path.suffix.lower() == ".safetensors":
        src = open_safetensors(path)
    else:
        tensors = _flatten(_unwrap(load_pickle_checkpoint(path)))
        src = TensorSource({k: v.shape for k, v in tensors.items()}, tensors.__getitem__, name=str(path))
    if not list(src.keys()):
        raise CheckpointError(f"upscaler {path}: holds no tensors")
    return _strip_prefixes(src)


# What a file that is not an upscaler looks like, by its tensor names: (test, description), first match wins.
OTHER_KINDS = [
    (lambda k: k.startswith(("model.diffusion_model.", "conditioner.embedders.")),
     "a Stable Diffusion checkpoint ('model.diffusion_model.*'); load it as the model, not as an upscaler"),
    (lambda k: k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k or "lora.down" in k,
     "a LoRA ('lora_unet_*' / '*.lora_down.*'); use it in a prompt as <lora:name:1>"),
    (lambda k: "input_hint_block." in k or k.startswith("controlnet_cond_embedding."),
     "a ControlNet ('input_hint_block.*')"),
    (lambda k: k.startswith(("string_to_param.", "emb_params", "clip_l", "clip_g")),
     "a textual-inversion embedding"),
    (lambda k: k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")), "a VAE ('decoder.up.*')"),
    (lambda k: k.startswith(("down_blocks.", "mid_block.")), "a diffusers UNet or ControlNet ('down_blocks.*')"),
]


def _not_an_upscaler(src: TensorSource, path) -> CheckpointError:
    keys = list(src.keys())
    for test, what in OTHER_KINDS:
        if any(test(k) for k in keys):
            return CheckpointError(f"upscaler {path}: not an upscaler but {what}")
    names = ", ".join(repr(k) for k in keys[:3])
    known = ", ".join(arch for arch, _, _ in ARCHITECTURES)
    return CheckpointError(f"upscaler {path}: an unknown architecture ({len(keys)} tensors such as {names}); "
                           f"kiln reads {known}")


def _detect(src: TensorSource, path):
    shapes = {k: src.shape(k) for k in src.keys()}
    for arch, test, build in ARCHITECTURES:
        if test(shapes):
            return arch, build, shapes
    raise _not_an_upscaler(src, path)


def upscaler_arch(path) -> str:
    """The architecture's display name (e.g. "ESRGAN"), read from tensor names only (a safetensors file's header; a
    pickle is read whole, memory-mapped). Errors as `load_upscaler`'s."""
    src = open_upscaler_file(path)
    return _detect(src, path)[0]


def load_upscaler(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> SRModule:
    """The upscaler in `path` as an eval-mode network on `device` in `dtype`: `.scale`, `.arch`, `.name` (the file's
    stem), `.dtype`, `.supports_half`, and `forward(x)`: [B, 3, H, W] in [0, 1] → [B, 3, scale·H, scale·W],
    unclamped, for any H, W ≥ 1."""
    src = open_upscaler_file(path)
    arch, build, shapes = _detect(src, path)
    try:
        with torch.device("meta"):
            model, names = build(shapes, src.get)
    except (ValueError, KeyError, IndexError) as e:
        reason = f"no tensor {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"upscaler {path}: looks like {arch} but does not fit its layout ({reason})") from None
    if (model.in_channels, model.out_channels) != (3, 3):
        raise CheckpointError(f"upscaler {path}: a {arch} model for {model.in_channels}-channel images "
                              f"({model.out_channels} out); kiln upscales RGB images")
    expected = model.state_dict()
    missing = [k for k in expected if k not in names]
    extra = [names[k] for k in names if k not in expected]
    wrong = [k for k in expected if k in names and shapes[names[k]] != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise CheckpointError(f"upscaler {path}: does not match its detected {arch} layout: {len(missing)} tensors "
                              f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), "
                              f"{len(wrong)} of the wrong shape (e.g. {wrong[:2]})")
    state = {k: src.get(names[k]).to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.name = Path(path).stem
    return model.to(device).requires_grad_(False).eval()  # .to: the derived buffers, made on the CPU
