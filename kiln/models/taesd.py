"""TAESD, the tiny distilled autoencoder of Stable Diffusion's latent space (madebyollin/taesd): a decoder of about
1.2 M parameters that turns UNet latents into pictures at a fraction of the VAE's cost, and its encoder.

The modules are numbered as the published `taesd_decoder.pth` / `taesd_encoder.pth` number their keys
(`1.weight`, `3.conv.0.weight`, …: one `nn.Sequential` each), so those files load as they are. Both work in the
UNet's latent space directly (no scale factor) and in pixels in [0, 1]. TAESD (SD 1.x/2.x) and TAESDXL differ only
in their weights; TAESD3 and TAEF1 have 16 latent channels.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv import Conv2d

WIDTH = 64  # every published TAESD has 64 channels throughout
STAGES = 3  # three 2x resamplings: 8x between pixels and latents


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> Conv2d:
    return Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Squashes latents smoothly into (-limit, limit): the decoder never sees values it was not trained on."""

    def __init__(self, limit: float = 3.0):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        return torch.tanh(x / self.limit) * self.limit


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, added to the input, then a ReLU (`conv.0/2/4`, as the files)."""

    def __init__(self, ch: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(_conv(ch, ch), nn.ReLU(), _conv(ch, ch), nn.ReLU(), _conv(ch, ch))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


class TAESDDecoder(nn.Sequential):
    """UNet latents [B, C, h, w] → pixels [B, 3, 8h, 8w], about [0, 1] (callers clamp)."""

    def __init__(self, latent_channels: int = 4):
        layers = [SoftClamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
        for _ in range(STAGES):
            layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2, mode="nearest"),
                       _conv(WIDTH, WIDTH, bias=False)]
        layers += [Block(), _conv(WIDTH, 3)]
        super().__init__(*layers)
        self.latent_channels = latent_channels


class TAESDEncoder(nn.Sequential):
    """Pixels [B, 3, H, W] in [0, 1] → UNet latents [B, C, H/8, W/8]."""

    def __init__(self, latent_channels: int = 4):
        layers = [_conv(3, WIDTH), Block()]
        for _ in range(STAGES):
            layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), Block(), Block(), Block()]
        layers += [_conv(WIDTH, latent_channels)]
        super().__init__(*layers)
        self.latent_channels = latent_channels


# the convolution that takes the latents (decoder) or gives them (encoder): its shape tells the latent channels
DECODER_IN = "1.weight"
ENCODER_OUT = f"{2 + 4 * STAGES}.weight"
