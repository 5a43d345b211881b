"""ControlNet (Zhang et al., 2023): a trainable copy of the UNet's encoder that reads a control image (edges, a
pose, depth…) and adds its features, through zero-initialised 1×1 convolutions, to the UNet's skips and middle block.
Attribute names mirror lllyasviel's checkpoints (`control_model.*`, the layout of ControlNet 1.0/1.1 files)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conv import Conv2d
from .unet import UNetConfig, build_encoder, embed, like_weights

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # the hint encoder's widths; stride 2 into 32, 96 and 256: 8x down
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig
    hint_channels: int = 3


def hint_block(hint_channels: int, model_channels: int) -> nn.Sequential:
    """The control image (at the picture's size) → features at the latent's size: 3×3 convolutions with SiLU between,
    the last one zero-initialised in training (`input_hint_block.{0,2,…,14}`)."""
    layers, ch = [], hint_channels
    for out, stride in zip(HINT_CHANNELS, HINT_STRIDES):
        layers += [Conv2d(ch, out, 3, padding=1, stride=stride), nn.SiLU()]
        ch = out
    layers.append(Conv2d(ch, model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNetModel(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        skip_chans, ch, _, _ = build_encoder(self, u)
        self.input_hint_block = hint_block(cfg.hint_channels, u.model_channels)
        self.zero_convs = nn.ModuleList([nn.Sequential(Conv2d(c, c, 1)) for c in skip_chans])
        self.middle_block_out = nn.Sequential(Conv2d(ch, ch, 1))

    @property
    def dtype(self):
        return self.time_embed[0].weight.dtype

    def forward(self, x, hint, t, context, y=None) -> list[torch.Tensor]:
        """The residuals for the UNet (one per input block, then the middle block's) of latents x [B, C, h, w] at
        timesteps t [B] with a control image `hint` [B, hint_channels, 8h, 8w] in [0, 1]."""
        emb = embed(self, self.cfg.unet, t, y, self.dtype)
        context = context.to(self.dtype)
        guide = self.input_hint_block(like_weights(hint.to(self.dtype), self.input_hint_block[0]))
        h = like_weights(x.to(self.dtype), self.input_blocks[0][0])
        outs = []
        for k, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if k == 0:
                h = h + guide
            outs.append(zero(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
