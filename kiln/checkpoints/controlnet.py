"""ControlNet files: lllyasviel's layout (`control_model.*`, or the same names without the prefix; `.pth`/`.ckpt`
through the restricted unpickler, or `.safetensors`; fp32 or the fp16 "pruned" files of ControlNet 1.0/1.1) and
diffusers' `ControlNetModel` (a folder with `diffusion_pytorch_model.safetensors`, or that file alone: SD 1.x/2.x and
SDXL ControlNets), read into `kiln.models.controlnet.ControlNetModel`, and checked against the model they are to
steer."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.controlnet import ControlNetConfig, ControlNetModel
from .detect import unet_config
from .sources import open_file

CONTROL = "control_model."
SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")


def controlnet_prefix(src) -> str:
    """The prefix the file's ControlNet tensors carry, or an error naming what the file seems to be instead."""
    for prefix in (CONTROL, ""):
        if f"{prefix}input_hint_block.0.weight" in src and f"{prefix}zero_convs.0.0.weight" in src:
            return prefix
    raise CheckpointError(f"{src.name}: not a ControlNet (no 'control_model.input_hint_block.*' tensors, nor "
                          "diffusers' 'controlnet_cond_embedding.*')")


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
         "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0"}


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{RESNET[name]}.{param}"


def lllyasviel_key(key: str, layers: int) -> str | None:
    """The lllyasviel name of a diffusers ControlNet tensor (`layers`: ResBlocks per level), None if it has none."""
    for theirs, ours in FIXED.items():
        if key.startswith(theirs + "."):
            return ours + key[len(theirs):]
    per_level = layers + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        b, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if what == "downsamplers":
            return f"input_blocks.{1 + b * per_level + layers}.0.op.{rest.removeprefix('conv.')}"
        i = 1 + b * per_level + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if what == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    return None


def weights_file(path: Path) -> Path:
    """The file holding a ControlNet's tensors: `path` itself, or a diffusers folder's diffusion_pytorch_model.*."""
    if not path.is_dir():
        return path
    found = [f for f in (path / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin")) if f.is_file()]
    if not found:
        raise CheckpointError(f"ControlNet {path}: a folder without diffusion_pytorch_model.safetensors (or .bin)")
    return found[0]


def model_name(path: Path) -> str:
    """A ControlNet's name: the file's stem, or a diffusers folder's own name (`controlnet-canny-sdxl-1.0`)."""
    return path.name if path.is_dir() else path.stem


def open_controlnet(path: Path):
    """(the file or folder as a source under lllyasviel's names, their prefix)."""
    path = weights_file(path)
    src = open_file(path)
    if "controlnet_cond_embedding.conv_in.weight" not in src:
        return src, controlnet_prefix(src)
    layers = len({int(m[1]) for k in src.keys() if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    mapping = {}
    for key in src.keys():
        ours = lllyasviel_key(key, layers)
        if ours is None:
            raise CheckpointError(f"ControlNet {path}: an unexpected tensor {key!r} for diffusers' ControlNetModel")
        mapping[ours] = key
    return src.renamed(mapping, str(path)), ""


def controlnet_config(src, prefix: str) -> ControlNetConfig:
    unet = unet_config(src, prefix, out_channels=4)
    return ControlNetConfig(unet, hint_channels=src.shape(f"{prefix}input_hint_block.0.weight")[1])


def with_heads(cfg: ControlNetConfig, src, base=None) -> ControlNetConfig:
    """Attention heads do not show in tensor shapes: the file's own `kiln_config` (kiln's demo ControlNets) says
    them, else the base model the ControlNet is a copy of (`base`, its UNetConfig), whose encoder must match."""
    import json

    heads = None
    if "kiln_config" in src.metadata:
        unet = json.loads(src.metadata["kiln_config"]).get("unet", {})
        heads = {k: unet[k] for k in ("num_heads", "num_head_channels") if k in unet}
    elif base is not None and (base.model_channels, base.context_dim, base.channel_mult) == \
            (cfg.unet.model_channels, cfg.unet.context_dim, cfg.unet.channel_mult):
        heads = dict(num_heads=base.num_heads, num_head_channels=base.num_head_channels)
    return replace(cfg, unet=replace(cfg.unet, **heads)) if heads else cfg


def load_controlnet(path, *, dtype: torch.dtype = torch.float32, device="cpu", base=None) -> ControlNetModel:
    """A ControlNet file (or diffusers folder) as a model on `device` in `dtype` (`base`: the UNetConfig of the
    model it is to steer, for what shapes do not show); errors name the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet {path}: no such file")
    src, prefix = open_controlnet(path)
    cfg = with_heads(controlnet_config(src, prefix), src, base)
    with torch.device("meta"):
        model = ControlNetModel(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if prefix + k not in src]
    wrong = [k for k in expected if k not in missing and src.shape(prefix + k) != tuple(expected[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"ControlNet {path}: does not match its detected layout: {len(missing)} tensors "
                              f"missing (e.g. {missing[:2]}), {len(wrong)} of the wrong shape (e.g. {wrong[:2]})")
    state = {k: src.get(prefix + k).to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.name = model_name(path)
    return model.requires_grad_(False).eval()


def check_fits(control: ControlNetModel, unet_cfg, name: str):
    """A ControlNet made for another base model (SD 1.x / 2.x / XL) cannot steer this one: a clear refusal."""
    c = control.cfg.unet
    mine = (c.model_channels, c.context_dim, c.channel_mult, c.adm_in_channels)
    theirs = (unet_cfg.model_channels, unet_cfg.context_dim, unet_cfg.channel_mult, unet_cfg.adm_in_channels)
    if mine != theirs:
        family = lambda ctx, adm: "SDXL" if adm else {768: "SD 1.x", 1024: "SD 2.x"}.get(ctx, f"context {ctx}")
        raise CheckpointError(f"ControlNet {name} was made for {family(c.context_dim, c.adm_in_channels)} "
                              f"models; this model is {family(unet_cfg.context_dim, unet_cfg.adm_in_channels)} "
                              f"(its UNet: {theirs[0]} channels, context {theirs[1]})")
