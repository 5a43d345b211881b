"""Image upscaler networks (ESRGAN/RRDBNet, Real-ESRGAN's SRVGGNetCompact, SwinIR, DAT) as plain nn.Modules.

Each module's attribute names mirror the tensor names of the files it is loaded from (BasicSR's names), so a state
dict loads strictly; `kiln.checkpoints.upscaler` reads the files, detects the architecture and its sizes, renames older
layouts and builds these. Every network takes [B, C, H, W] in [0, 1] and returns [B, C, scale·H, scale·W], unclamped,
for any H, W ≥ 1: inputs are padded to what the network needs and the padding is cropped off the result."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SRModule", "pad_to"]


def pad_to(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """`x` padded on the right and bottom to at least `minimum` and a multiple of `multiple` pixels each way.

    Reflection first (it continues the image's texture; it can add at most size - 1 pixels), the rest replicated: the
    rule spandrel (the library ComfyUI and chaiNNer use) applies, so that both give the same pixels near the edges."""
    h, w = x.shape[-2:]
    want = lambda n: -(-max(n, minimum) // multiple) * multiple
    pad_h, pad_w = want(h) - h, want(w) - w
    if not (pad_h or pad_w):
        return x
    reflect_h, reflect_w = min(pad_h, h - 1), min(pad_w, w - 1)
    if reflect_h or reflect_w:
        x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        x = F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return x


class SRModule(nn.Module):
    """What every upscaler network has: `scale` (output size / input size), `arch` (a display name), `name` (the
    file's stem, set by the loader), `dtype` (of its weights), `in_channels`/`out_channels` (of the images),
    `supports_half` (False where spandrel does not trust float16: SwinIR, DAT; use bfloat16 or float32), and
    `multiple`/`minimum`, the input sizes its body needs (`forward` pads to them and crops the result)."""

    arch = ""
    multiple = 1
    minimum = 0
    supports_half = True

    def __init__(self, scale: int, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.scale, self.in_channels, self.out_channels = scale, in_channels, out_channels
        self.name = ""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.body_forward(pad_to(x, self.multiple, self.minimum))
        return y[..., : h * self.scale, : w * self.scale]
