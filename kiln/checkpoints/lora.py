"""LoRA files: kohya/A1111 (`lora_unet_*`, `lora_te_*` with `alpha`), LyCORIS LoCon (the same names, convolution
down-projections) and diffusers/PEFT (`unet.….lora_A/lora_B`, `….lora.down/up`, attention-processor names).

Every format is read into the same thing: for each weight of ours that it changes, the low-rank pair
(up, down) and its scale alpha / rank, so that  W' = W + multiplier · scale · up @ down  (reshaped to W's shape:
a k×k convolution's down-projection carries the kernel). Module names are matched against our own weights in
both spellings a LoRA may use: the CompVis names (`input_blocks_1_1_…`) and the diffusers names
(`down_blocks_0_attentions_0_…`), from the same key map the diffusers-folder loader uses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .diffusers_keys import unet_key

UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model.transformer."


@dataclass
class Patch:
    key: str  # our state-dict key of the weight it changes
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    def delta(self, shape, dtype, device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        d = (up @ down) * self.scale
        if d.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"LoRA for {self.key}: rank product {tuple(d.shape)} does not fit the weight "
                                  f"{tuple(shape)}")
        return d.reshape(shape).to(dtype)


@dataclass
class Lora:
    name: str
    path: str
    sha256: str
    patches: list[Patch]
    unmatched: list[str] = field(default_factory=list)

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]  # A1111's "Lora hashes" use 12 hex digits


def module_names(state_keys, num_res_blocks: int) -> dict[str, str]:
    """Every name a LoRA may give one of our weights' modules → that weight's key."""
    names = {}
    for key in state_keys:
        if not key.endswith(".weight"):
            continue
        if key.startswith(UNET_PREFIX):
            ours = key[len(UNET_PREFIX):-len(".weight")]
            spellings = {"unet:" + ours}
            try:
                spellings.add("unet:" + unet_key(ours + ".weight", num_res_blocks)[:-len(".weight")])
            except KeyError:
                pass
        elif key.startswith(TE_PREFIX):
            ours = key[len(TE_PREFIX):-len(".weight")]
            spellings = {"te:" + ours, "te:" + ours.removeprefix("text_model.")}
        else:
            continue
        for s in spellings:
            names[s] = key
            names[s.replace(".", "_")] = key
    return names


_KOHYA = re.compile(r"^lora_(unet|te1?)_(.+?)\.(lora_down|lora_up|alpha|lora_mid|hada_\w+|lokr_\w+)(?:\.weight)?$")
_PEFT = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_PROCESSOR = re.compile(r"^(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _groups(tensors: dict) -> tuple[dict, list]:
    """{(part, module): {"up", "down", "alpha"}} from any supported key layout; keys that fit none."""
    groups, other = {}, []
    for k, t in tensors.items():
        if m := _KOHYA.match(k):
            part, module, kind = ("unet" if m[1] == "unet" else "te"), m[2], m[3]
            if kind.startswith(("hada_", "lokr_")) or kind == "lora_mid":
                raise CheckpointError(f"LyCORIS {kind.split('_')[0]} weights ({k}) are not supported; LoRA and "
                                      "LoCon files are")
            groups.setdefault((part, module), {})[{"lora_down": "down", "lora_up": "up", "alpha": "alpha"}[kind]] = t
        elif m := _PROCESSOR.match(k):
            module = f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}"
            groups.setdefault(("unet", module.removeprefix("unet.")), {})[m[3]] = t
        elif m := _PEFT.match(k):
            part = "unet" if m[1] == "unet" else "te"
            kind = {"lora_A": "down", "lora.down": "down", "lora_B": "up", "lora.up": "up"}[m[3]]
            groups.setdefault((part, m[2]), {})[kind] = t
        elif m := re.match(r"^(.+?)\.(lora\.down|lora\.up)\.weight$", k):  # older diffusers, no prefix: the UNet
            groups.setdefault(("unet", m[1]), {})["down" if m[2].endswith("down") else "up"] = t
        else:
            other.append(k)
    return groups, other


def read_lora(path, state_keys, num_res_blocks: int, name: str | None = None) -> Lora:
    """Read a LoRA file (.safetensors, or .pt/.ckpt/.bin through the restricted unpickler) against our weights."""
    from .hashes import addnet_sha256

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA {path}: no such file")
    from .sources import read_small_file

    tensors = read_small_file(path, "LoRA")
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"LoRA {path}: not a dictionary of tensors")
    groups, other = _groups(tensors)
    if not groups:
        raise CheckpointError(f"LoRA {path}: no LoRA weights found (keys such as lora_unet_…lora_down.weight or "
                              f"unet.….lora_A.weight); first keys: {', '.join(list(tensors)[:3])}")
    names = module_names(state_keys, num_res_blocks)
    patches, unmatched = [], list(other)
    for (part, module), g in sorted(groups.items()):
        key = names.get(f"{part}:{module}") or names.get(f"{part}:{module.replace('.', '_')}")
        if key is None or "up" not in g or "down" not in g:
            unmatched.append(f"{part}:{module}")
            continue
        rank = g["down"].shape[0]
        alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)
        patches.append(Patch(key, g["up"], g["down"], alpha / rank))
    if not patches:
        raise CheckpointError(f"LoRA {path}: none of its {len(groups)} modules matches this model's layers "
                              f"(a LoRA for another model family?)")
    return Lora(name or path.stem, str(path.resolve()), addnet_sha256(path), patches, unmatched)


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_lora(name: str, lora_dir) -> Path:
    """A LoRA by name in `lora_dir` (file name with or without its suffix; never a path outside the folder)."""
    if lora_dir is None:
        raise CheckpointError(f"<lora:{name}:…> needs a LoRA folder (--lora-dir)")
    folder = Path(lora_dir).resolve()
    for p in sorted(folder.rglob("*")):
        if p.suffix in LORA_SUFFIXES and p.is_file() and (p.stem == name or p.name == name):
            if folder not in p.resolve().parents:
                continue
            return p
    raise CheckpointError(f"no LoRA named {name!r} in {folder}")
