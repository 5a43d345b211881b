"""Pieces the window-attention upscalers share (SwinIR, DAT): windows in and out, relative positions, shift masks,
and the pixel-shuffle upsampler both inherit from RCAN/EDSR."""
from __future__ import annotations

import math

import torch
from torch import nn


def windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, H, W, C] → [B·(H/wh)·(W/ww), wh·ww, C]: non-overlapping windows, row-major, each flattened."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def unwindows(x: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `windows`: [B·nW, wh·ww, C] → [B, H, W, C]."""
    c = x.shape[-1]
    x = x.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """[wh·ww, wh·ww] indices into a (2wh-1)·(2ww-1) table of biases, one per relative offset (Swin's layout).
    Made on the CPU even while a model is built on the meta device: it is derived, never loaded from the file."""
    arange = lambda n: torch.arange(n, device="cpu")
    coords = torch.stack(torch.meshgrid(arange(wh), arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shift_mask(h: int, w: int, wh: int, ww: int, sh: int, sw: int, device=None) -> torch.Tensor:
    """[nW, wh·ww, wh·ww]: -100 between positions that a cyclic shift by (sh, sw) brought into one window from
    different image regions, 0 elsewhere (the value Swin trains with, so it must be -100, not -inf)."""
    region = torch.zeros(1, h, w, 1, device=device)
    cuts = lambda win, shift: (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    label = 0
    for hs in cuts(wh, sh):
        for ws in cuts(ww, sw):
            region[:, hs, ws, :] = label
            label += 1
    labels = windows(region, wh, ww).squeeze(-1)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Upsample(nn.Sequential):
    """(conv to 4·C, pixel shuffle 2) per doubling, or one (conv to 9·C, shuffle 3) for 3×: `upsample.0`, `.2`..."""

    def __init__(self, scale: int, nf: int):
        if scale == 3:
            layers = [nn.Conv2d(nf, 9 * nf, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            layers = []
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2)]
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """One conv straight to out_nc·scale² channels and a pixel shuffle (the lightweight models)."""

    def __init__(self, scale: int, nf: int, out_nc: int):
        super().__init__(nn.Conv2d(nf, scale * scale * out_nc, 3, 1, 1), nn.PixelShuffle(scale))
