"""Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3, and the many community "compact"
models): `body.0` a 3×3 conv, then `num_conv` × (PReLU, conv), a PReLU, a last conv to out_nc·scale² channels,
pixel shuffle, plus the nearest-upscaled input (the network learns the residual). Tensor names as in the files."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import SRModule


class SRVGGNetCompact(SRModule):
    arch = "RealESRGAN compact"

    def __init__(self, *, in_nc: int = 3, out_nc: int = 3, nf: int = 64, num_conv: int = 16, scale: int = 4):
        super().__init__(scale, in_nc, out_nc)
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")
