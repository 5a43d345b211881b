"""Overlapping tiles blended by distance to the tile border: CompVis' `split_input_params` path
(`LatentDiffusion.get_fold_unfold` / `get_weighting` / `delta_border`), as plain functions.

`tiled(fn, x, ks, stride, uf=1, ...)` cuts x into ks-sized tiles every `stride` pixels, applies `fn` to each (which
may upsample by `uf`, as a decoder does), weights each output tile by its clipped distance to the tile border (and,
with `tie_braker`, by the tile's distance to the border of the tile grid) and folds them back, normalised by the
summed weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def delta_border(h: int, w: int) -> torch.Tensor:
    """[h·w] normalised distance of each pixel to the nearest border (0 on the border, 0.5 in the middle)."""
    y = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    x = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    arr = torch.stack([y / max(h - 1, 1), x / max(w - 1, 1)], dim=-1)
    return torch.minimum(arr.min(dim=-1).values, (1 - arr).min(dim=-1).values).reshape(-1)


def weighting(h, w, ly, lx, clip_min=0.01, clip_max=0.5, tie_braker=False, tie_min=0.01, tie_max=0.5):
    """[1, h·w, ly·lx]: each tile's pixel weights (one column per tile)."""
    wgt = delta_border(h, w).clamp(clip_min, clip_max).view(1, h * w, 1).repeat(1, 1, ly * lx)
    if tie_braker:
        wgt = wgt * delta_border(ly, lx).clamp(tie_min, tie_max).view(1, 1, ly * lx)
    return wgt


@torch.no_grad()
def tiled(fn, x: torch.Tensor, ks, stride, uf: int = 1, clip_min=0.01, clip_max=0.5, tie_braker=False,
          tie_min=0.01, tie_max=0.5, df: int = 1) -> torch.Tensor:
    """`uf` > 1: fn upsamples by uf (a decoder); `df` > 1: fn downsamples by df (an encoder; ks and stride must
    be multiples of df)."""
    b, c, h, w = x.shape
    ks = (min(ks[0], h), min(ks[1], w))
    stride = (min(stride[0], h), min(stride[1], w))
    ly, lx = (h - ks[0]) // stride[0] + 1, (w - ks[1]) // stride[1] + 1
    if (h - ks[0]) % stride[0] or (w - ks[1]) % stride[1]:
        raise ValueError(f"tiles of {ks} every {stride} do not cover a {h}x{w} input exactly "
                         "(size - ks must be a multiple of stride)")
    tiles = F.unfold(x, ks, stride=stride).view(b, c, ks[0], ks[1], ly * lx)
    outs = torch.stack([fn(tiles[..., i]) for i in range(ly * lx)], dim=-1)  # [b, c', ks·uf, ks·uf, L]
    if any(v % df for v in (*ks, *stride, h, w)):
        raise ValueError(f"tile size, stride and input must be multiples of {df}")
    oh, ow = ks[0] * uf // df, ks[1] * uf // df
    H, W = h * uf // df, w * uf // df
    wgt = weighting(oh, ow, ly, lx, clip_min, clip_max, tie_braker, tie_min, tie_max).to(outs)
    fold = lambda t: F.fold(t, (H, W), (oh, ow), stride=(stride[0] * uf // df, stride[1] * uf // df))
    norm = fold(wgt).view(1, 1, H, W)
    o = outs * wgt.view(1, 1, oh, ow, ly * lx)
    return fold(o.reshape(b, -1, ly * lx)) / norm


def from_split_input_params(p: dict) -> dict:
    """Keyword arguments of `tiled` from CompVis' `split_input_params` dict."""
    return dict(ks=tuple(p["ks"]), stride=tuple(p["stride"]), clip_min=p.get("clip_min_weight", 0.01),
                clip_max=p.get("clip_max_weight", 0.5), tie_braker=p.get("tie_braker", False),
                tie_min=p.get("clip_min_tie_weight", 0.01), tie_max=p.get("clip_max_tie_weight", 0.5))


@torch.no_grad()
def tiled_cover(fn, x: torch.Tensor, ks: int, stride: int, uf: int = 1, df: int = 1, **kw) -> torch.Tensor:
    """`tiled` for any size: the input is padded (edge pixels repeated) on the bottom and right up to the next size
    the tiles cover exactly, and the output cropped back."""
    h, w = x.shape[-2:]
    kh, kw_ = min(ks, h), min(ks, w)
    kh, kw_ = kh - kh % df, kw_ - kw_ % df
    sh, sw = max(df, min(stride, kh) // df * df), max(df, min(stride, kw_) // df * df)
    H = kh + -(-(h - kh) // sh) * sh
    W = kw_ + -(-(w - kw_) // sw) * sw
    if (H, W) != (h, w):
        x = F.pad(x, (0, W - w, 0, H - h), mode="replicate")
    out = tiled(fn, x, (kh, kw_), (sh, sw), uf=uf, df=df, **kw)
    return out[..., : h * uf // df, : w * uf // df]
