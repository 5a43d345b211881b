"""ControlNet files: lllyasviel's layout (`control_model.*`, or the same names without the prefix; `.pth`/`.ckpt`
through the restricted unpickler, or `.safetensors`; fp32 or the fp16 "pruned" files of ControlNet 1.0/1.1), read
into `kiln.models.controlnet.ControlNetModel`, and checked against the model they are to steer."""
from __future__ import annotations

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
    if "controlnet_cond_embedding.conv_in.weight" in src:
        raise CheckpointError(f"{src.name}: a ControlNet in diffusers' layout; kiln reads lllyasviel's layout "
                              "(control_model.*) so far")
    raise CheckpointError(f"{src.name}: not a ControlNet (no 'control_model.input_hint_block.*' tensors)")


def controlnet_config(src, prefix: str) -> ControlNetConfig:
    unet = unet_config(src, prefix, out_channels=4)
    return ControlNetConfig(unet, hint_channels=src.shape(f"{prefix}input_hint_block.0.weight")[1])


def load_controlnet(path, *, dtype: torch.dtype = torch.float32, device="cpu") -> ControlNetModel:
    """A ControlNet file as a model on `device` in `dtype`; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ControlNet {path}: no such file")
    src = open_file(path)
    prefix = controlnet_prefix(src)
    cfg = controlnet_config(src, prefix)
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
    model.name = path.stem
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
