"""TAESD weights: madebyollin's `taesd_decoder.pth` / `.safetensors` (and `taesdxl_*`, `taesd_encoder.*`: the files
A1111 keeps in `models/VAE-approx` and ComfyUI in `models/vae_approx`), and diffusers `AutoencoderTiny` folders
(config.json + diffusion_pytorch_model.safetensors, whose `decoder.layers.N` is the published file's `N+1`: the
published decoder counts its soft clamp as module 0). Pickles go through the restricted unpickler.

Which latent space a file was made for cannot be told from its tensors for 4-channel files (TAESD for SD 1.x/2.x
and TAESDXL have the same shapes): the family comes from the file or folder name (`taesdxl…`, `taesd…`, `taesd3…`,
`taef1…`) or the diffusers config's `_name_or_path`, and is None when neither says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.conv import prepack
from ..models.taesd import DECODER_IN, ENCODER_OUT, TAESDDecoder, TAESDEncoder
from .sources import open_file

PARTS = ("decoder", "encoder")
# name fragment → latent space; the longer fragments first ("taesdxl" also contains "taesd")
FAMILY_MARKS = (("taesdxl", "sdxl"), ("taesd3", "sd3"), ("taef1", "flux"), ("taesd", "sd"))
FAMILY_LABELS = {"sd": "SD 1.x/2.x (TAESD)", "sdxl": "SDXL (TAESDXL)", "sd3": "SD3 (TAESD3)", "flux": "FLUX (TAEF1)"}
# AutoencoderTiny's config as every published TAESD has it (the architecture kiln's modules build)
DIFFUSERS_SHAPE = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
                   "encoder_block_out_channels": [64] * 4, "decoder_block_out_channels": [64] * 4,
                   "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1]}


@dataclass
class TinyAutoencoder:
    """A loaded TAESD decoder or encoder. The module works on `latents / scale + shift` (diffusers' scaling_factor
    and shift_factor: 1 and 0 for TAESD and TAESDXL, whose modules take the UNet's latents as they are)."""
    module: torch.nn.Module
    part: str
    family: str | None  # sd | sdxl | sd3 | flux, or None when the name does not say
    path: str
    scale: float = 1.0
    shift: float = 0.0

    @property
    def name(self) -> str:
        p = Path(self.path)
        return p.name if p.is_dir() else p.stem

    @property
    def latent_channels(self) -> int:
        return self.module.latent_channels


def family_from_name(text: str) -> str | None:
    low = text.lower()
    return next((family for mark, family in FAMILY_MARKS if mark in low), None)


def load_taesd(path, part: str = "decoder", dtype: torch.dtype = torch.float32, device="cpu") -> TinyAutoencoder:
    """A TAESD `part` ("decoder" or "encoder") from a file or a diffusers folder; one-line errors."""
    if part not in PARTS:
        raise ValueError(part)
    path = Path(path)
    what = f"TAESD {part} {path}"
    if not path.exists():
        raise CheckpointError(f"{what}: no such file or folder")
    scale, shift, family = 1.0, 0.0, family_from_name(path.name)
    if path.is_dir():
        cfg, file = _diffusers_folder(path, what)
        scale, shift = float(cfg.get("scaling_factor", 1.0)), float(cfg.get("shift_factor", 0.0) or 0.0)
        family = family or family_from_name(str(cfg.get("_name_or_path", "")))
    else:
        file = path
    src = open_file(file)
    state = _our_names({k: src.get(k) for k in src.keys()}, part, what)
    module = _build(state, part, what)
    module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    prepack(module, True)  # on CPUs in fp32: 1.9x faster at 512x512, for a packed copy of 5 MB (kiln.models.conv)
    return TinyAutoencoder(module, part, family, str(path), scale, shift)


def _diffusers_folder(root: Path, what: str) -> tuple[dict, Path]:
    from . import _component_file

    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{what}: a diffusers AutoencoderTiny folder needs a readable config.json") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderTiny":
        name = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{what}: config.json describes a {name or 'model of unknown class'}, not an "
                              "AutoencoderTiny")
    odd = sorted(k for k, v in DIFFUSERS_SHAPE.items() if k in cfg and _norm(cfg[k]) != _norm(v))
    if odd or cfg.get("in_channels", 3) != 3 or cfg.get("out_channels", 3) != 3:
        raise CheckpointError(f"{what}: an AutoencoderTiny of another architecture ({', '.join(odd) or 'channels'}"
                              " differ from TAESD's); kiln reads TAESD's")
    file = _component_file(root, "diffusion_pytorch_model")
    if file is None:
        raise CheckpointError(f"{what}: no diffusion_pytorch_model.safetensors (or .bin) in the folder")
    return cfg, file


def _a(part: str) -> str:
    return "an encoder" if part == "encoder" else "a decoder"


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _our_names(tensors: dict, part: str, what: str) -> dict:
    """The tensors of `part` under the published file's names, from any of the layouts."""
    other = PARTS[1 - PARTS.index(part)]
    diffusers = f"{part}.layers."
    if any(k.startswith(diffusers) for k in tensors):
        offset = 1 if part == "decoder" else 0  # the published decoder's module 0 is its clamp
        out = {}
        for k, v in tensors.items():
            if k.startswith(diffusers):
                index, _, rest = k[len(diffusers):].partition(".")
                out[f"{int(index) + offset}.{rest}"] = v
        return out
    if any(k.startswith(part + ".") for k in tensors):  # a whole TAESD in one file: encoder.N…, decoder.N…
        return {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
    if any(k.startswith((other + ".", f"{other}.layers.")) for k in tensors):
        raise CheckpointError(f"{what}: holds a TAESD {other}, not {_a(part)}")
    if not all(k.split(".")[0].isdigit() for k in tensors):
        raise CheckpointError(f"{what}: not a TAESD file (expected keys such as 1.weight and 3.conv.0.weight, "
                              f"found e.g. {next(iter(tensors), 'none')!r})")
    looks = _published_part(tensors)
    if looks != part:
        raise CheckpointError(f"{what}: " + (f"holds a TAESD {looks}, not {_a(part)}" if looks else
                                             "not a TAESD file (its first convolutions have unexpected shapes)"))
    return tensors


def _published_part(tensors: dict) -> str | None:
    """decoder / encoder / None from the first convolution of a published file: the encoder's reads 3 colours,
    the decoder's module 0 is its clamp, so its first convolution is module 1."""
    first = tensors.get("0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 3:
        return "encoder"
    conv = tensors.get(DECODER_IN)
    return "decoder" if conv is not None and conv.ndim == 4 and "0.weight" not in tensors else None


def _build(state: dict, part: str, what: str) -> torch.nn.Module:
    key = DECODER_IN if part == "decoder" else ENCODER_OUT
    if key not in state or state[key].ndim != 4:
        raise CheckpointError(f"{what}: no {key} convolution; not a TAESD {part}")
    channels = state[key].shape[1] if part == "decoder" else state[key].shape[0]
    module = (TAESDDecoder if part == "decoder" else TAESDEncoder)(int(channels))
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    for problem, keys in (("lacks", missing), ("has unexpected tensors", extra), ("has wrongly shaped", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise CheckpointError(f"{what}: {problem} {', '.join(keys[:3])}{more} (a TAESD {part} of another "
                                  "architecture?)")
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module


def describe_family(family: str | None) -> str:
    return FAMILY_LABELS.get(family, "an unknown latent space")
