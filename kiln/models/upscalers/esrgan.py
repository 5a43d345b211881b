"""ESRGAN's RRDBNet (Wang et al. 2018) under BasicSR's tensor names, as Real-ESRGAN ships it: `conv_first`,
`body.N.rdb{1,2,3}.conv{1..5}`, `conv_body`, `conv_up{1..}`, `conv_hr`, `conv_last`. The original `model.N` layout
(and BSRGAN's `RRDB_trunk`) is renamed to these by the loader.

Variants: 1×/2×/4×/8× by the number of nearest-neighbour + conv upsampling steps; the pixel-unshuffle input of
Real-ESRGAN x2plus (and the 1× models): the image is folded into 4 or 16 times the channels first, so a 4× body
gives 2× (or 1×); ESRGAN+ adds a 1×1 conv shortcut in each dense block (`conv1x1`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import SRModule


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the block input and every earlier output (growth `gc` channels each)."""

    def __init__(self, nf: int, gc: int, plus: bool = False):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", _conv(nf + i * gc, gc))
        self.conv5 = _conv(nf + 4 * gc, nf)
        self.conv1x1 = nn.Conv2d(nf, gc, 1, bias=False) if plus else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2, inplace=True)
        x1 = act(self.conv1(x))
        x2 = act(self.conv2(torch.cat((x, x1), 1)))
        if self.conv1x1 is not None:  # ESRGAN+: a shortcut from the block input (after the activation, as trained)
            x2 = x2 + self.conv1x1(x)
        x3 = act(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = act(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        if self.conv1x1 is not None:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return torch.add(x, x5, alpha=0.2)  # residual scaling 0.2, one fused kernel


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, then the same 0.2-scaled residual around them."""

    def __init__(self, nf: int, gc: int, plus: bool = False):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc, plus) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.rdb3(self.rdb2(self.rdb1(x))), alpha=0.2)


class RRDBNet(SRModule):
    """`upsamples` doublings (2**upsamples = the body's scale); `shuffle` 2 or 4 folds the input by pixel-unshuffle
    first (`in_nc` = 3·shuffle²), dividing the overall scale by it."""

    arch = "ESRGAN"

    def __init__(self, *, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32,
                 upsamples: int = 2, shuffle: int = 1, plus: bool = False):
        super().__init__(2**upsamples // shuffle, in_nc // (shuffle * shuffle), out_nc)
        self.shuffle, self.upsamples = shuffle, upsamples
        # spandrel pads unshuffled inputs to multiples of 4 (either factor) and every input to 2 pixels at least
        self.multiple, self.minimum = (4 if shuffle > 1 else 1), 2
        self.conv_first = _conv(in_nc, nf)
        self.body = nn.Sequential(*(RRDB(nf, gc, plus) for _ in range(nb)))
        self.conv_body = _conv(nf, nf)
        for i in range(upsamples):
            setattr(self, f"conv_up{i + 1}", _conv(nf, nf))
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, out_nc)

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle > 1:
            x = F.pixel_unshuffle(x, self.shuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.upsamples):
            up = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace=True)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
