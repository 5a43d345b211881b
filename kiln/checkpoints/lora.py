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
TE_PREFIXES = ("cond_stage_model.", "conditioner.")
# Text encoders in the order LoRA files number them (te / te1 = the first, te2 = SDXL's bigG); CLIP (Hugging Face
# names) or open_clip (fused q/k/v) layouts.
_ENCODERS = [("cond_stage_model.transformer.text_model.", "clip"), ("cond_stage_model.model.", "openclip"),
             ("conditioner.embedders.0.transformer.text_model.", "clip"),
             ("conditioner.embedders.0.model.", "openclip"),
             ("conditioner.embedders.1.model.", "openclip")]


@dataclass
class Patch:
    key: str  # our state-dict key of the weight it changes
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None  # the rows it changes (q, k or v of open_clip's fused in_proj)

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


def module_names(state_keys, num_res_blocks: int) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Every name a LoRA may give one of our weights' modules → (that weight's key, the rows it covers or None).
    Text-encoder names are prefixed "te:" (the first encoder) or "te2:" (SDXL's second), UNet names "unet:"."""
    keys = set(state_keys)
    names = {}

    def add(spellings, target):
        for s in spellings:
            names[s] = target
            names[s.replace(".", "_")] = target

    for key in keys:
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            ours = key[len(UNET_PREFIX):-len(".weight")]
            spellings = {"unet:" + ours}
            try:
                spellings.add("unet:" + unet_key(ours + ".weight", num_res_blocks)[:-len(".weight")])
            except KeyError:
                pass
            add(spellings, (key, None))
    encoders = [(pre, kind) for pre, kind in _ENCODERS if any(k.startswith(pre) for k in keys)]
    for index, (pre, kind) in enumerate(encoders):
        part = "te" if index == 0 else "te2"
        if kind == "clip":
            for key in keys:
                if key.startswith(pre) and key.endswith(".weight"):
                    ours = key[len(pre):-len(".weight")]
                    add({f"{part}:{ours}", f"{part}:text_model.{ours}"}, (key, None))
            continue
        # open_clip: Hugging Face's names (which LoRA trainers use) onto the fused layout
        layers = {int(m[1]) for k in keys if (m := re.match(re.escape(pre) + r"transformer\.resblocks\.(\d+)\.", k))}
        for i in layers:
            block, hf = f"{pre}transformer.resblocks.{i}.", f"encoder.layers.{i}."
            for j, qkv in enumerate("qkv"):
                names_for = {f"{part}:{hf}self_attn.{qkv}_proj", f"{part}:text_model.{hf}self_attn.{qkv}_proj"}
                add(names_for, (block + "attn.in_proj_weight", ("qkv", j)))
            for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):
                add({f"{part}:{hf}{theirs}", f"{part}:text_model.{hf}{theirs}",
                     f"{part}:transformer.resblocks.{i}.{ours}"}, (block + ours + ".weight", None))
    return names


_KOHYA = re.compile(r"^lora_(unet|te[12]?)_(.+?)\.(lora_down|lora_up|alpha|lora_mid|hada_\w+|lokr_\w+)(?:\.weight)?$")
# diffusers/PEFT: an optional part prefix (none: PEFT's own adapter of one model), PEFT's `base_model.model.`
# wrapper, the module, the pair (PEFT's lora_A/lora_B or older diffusers' lora.down/lora.up, with or without
# the adapter's name) or its alpha (files converted from kohya carry one per module).
_PEFT = re.compile(r"^(?:(unet|text_encoder(?:_2)?)\.)?(?:base_model\.model\.)?(.+?)\."
                   r"(?:(lora_A|lora_B|lora\.down|lora\.up)(?:\.[\w-]+)?\.weight|(alpha))$")
_PROCESSOR = re.compile(r"^(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PEFT_KIND = {"lora_A": "down", "lora.down": "down", "lora_B": "up", "lora.up": "up"}


def _groups(tensors: dict) -> tuple[dict, list]:
    """{(part, module): {"up", "down", "alpha"}} from any supported key layout; keys that fit none."""
    groups, other = {}, []
    for k, t in tensors.items():
        if m := _KOHYA.match(k):
            part, module, kind = {"te1": "te"}.get(m[1], m[1]), m[2], m[3]
            if kind.startswith(("hada_", "lokr_")) or kind == "lora_mid":
                raise CheckpointError(f"LyCORIS {kind.split('_')[0]} weights ({k}) are not supported; LoRA and "
                                      "LoCon files are")
            groups.setdefault((part, module), {})[{"lora_down": "down", "lora_up": "up", "alpha": "alpha"}[kind]] = t
        elif m := _PROCESSOR.match(k):
            module = f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}"
            groups.setdefault(("unet", module.removeprefix("unet.")), {})[m[3]] = t
        elif (m := _PEFT.match(k)) and not (m[4] and m[1] is None and m[2].startswith("lora_")):
            # no prefix: the UNet, unless the module is a text model's (a PEFT adapter of the text encoder alone)
            part = {"text_encoder": "te", "text_encoder_2": "te2", None: "te" if m[2].startswith("text_model.")
                    else "unet"}.get(m[1], m[1])
            groups.setdefault((part, m[2]), {})[_PEFT_KIND[m[3]] if m[3] else "alpha"] = t
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
    configs = adapter_configs(path)
    patches, unmatched = [], list(other)
    for (part, module), g in sorted(groups.items()):
        target = names.get(f"{part}:{module}") or names.get(f"{part}:{module.replace('.', '_')}")
        if target is None or "up" not in g or "down" not in g:
            unmatched.append(f"{part}:{module}")
            continue
        key, rows = target
        scale = _scale(g, configs.get(part, configs.get(None)), module)
        if rows is not None:  # ("qkv", j): the j-th third of the fused in_proj
            n = g["up"].shape[0]
            rows = (rows[1] * n, (rows[1] + 1) * n)
        patches.append(Patch(key, g["up"], g["down"], scale, rows))
    if not patches:
        raise CheckpointError(f"LoRA {path}: none of its {len(groups)} modules matches this model's layers "
                              f"(a LoRA for another model family?)")
    return Lora(name or path.stem, str(path.resolve()), addnet_sha256(path), patches, unmatched)


def adapter_configs(path: Path) -> dict:
    """PEFT LoRA settings (`lora_alpha`, `alpha_pattern`, `use_rslora`) that a file's alpha comes from when its
    tensors carry none: {part: settings} from diffusers' safetensors metadata (`lora_adapter_metadata`, keys
    prefixed `unet.`, `text_encoder.`, …), or {None: settings} from a PEFT `adapter_config.json` beside the file."""
    import json

    out = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            raise CheckpointError(f"LoRA {path}: its lora_adapter_metadata is not JSON") from None
        for k, v in meta.items():
            prefix, _, name = k.partition(".")
            out.setdefault({"text_encoder": "te", "text_encoder_2": "te2"}.get(prefix, prefix), {})[name] = v
    config = path.parent / "adapter_config.json"
    if not out and config.is_file():
        try:
            out[None] = json.loads(config.read_text())
        except ValueError:
            raise CheckpointError(f"LoRA {path}: {config} is not JSON") from None
    return out


def _scale(g: dict, config: dict | None, module: str) -> float:
    """alpha / rank (PEFT's rsLoRA: alpha / √rank): the alpha of the module's own tensor, else of the adapter's
    settings (an `alpha_pattern` entry matches the module name's end, as PEFT matches it), else the rank (scale 1)."""
    rank = g["down"].shape[0] if "down" in g else 1
    if "alpha" in g:
        return float(g["alpha"].item()) / rank
    if not config or "lora_alpha" not in config:
        return 1.0
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


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
