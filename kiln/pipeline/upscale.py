"""An image-model upscaler (ESRGAN, Real-ESRGAN, SwinIR, DAT: `kiln.checkpoints.upscaler`) run over a picture of any
size in overlapping tiles, so that memory stays bounded by the tile, not the picture.

The picture is cut into a grid of tiles of at most `tile` x `tile` input pixels that overlap their neighbours by at
least `overlap` pixels (evenly spaced, the last one flush with the edge). A tile's pixels next to an inner edge are
wrong (its convolutions saw zero padding where the whole picture has more picture), so each tile's output is
weighted: 0 over the first quarter of the overlap from an inner edge, rising linearly to 1 at three quarters, 1
elsewhere, and the weights are normalised to sum to 1 at every pixel. The weight is separable (a row ramp times a
column ramp), so the normaliser is two 1-D sums and no full-size weight canvas exists. Tile rows are accumulated in
a strip one tile row high on the model's device; the rows no later tile touches are rounded to uint8 at once.

Seams: within a quarter of the overlap of a tile's edge the padding's effect is large (a random-weight ESRGAN's
pixels there are off by up to the whole range). A plain linear crossfade over the whole overlap lets that through
(about 2-5% of values off by more than 1/255 for a random-weight 4x ESRGAN of 16 features and 2 blocks); skipping
the margin brings the tiled result within 1/255 of the whole picture's on more than 99.9% of values there
(tests/test_upscale.py). A network whose padding effect reaches further needs a larger overlap."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_TILE = 256  # input pixels; 0: the whole picture in one piece (A1111: 192)
DEFAULT_OVERLAP = 32
MARGIN = 0.25  # of the overlap, next to an inner edge: no weight (see above)


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the tiles along one side: one span if the side fits in a tile; else evenly spaced tiles of
    `tile` pixels, each overlapping the next by at least `overlap`."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n))]


def ramps(sides: list[tuple[int, int]], length: int, scale: int, overlap: int) -> list[torch.Tensor]:
    """The weight of each span's output pixels along one side, normalised so that the spans' weights sum to 1."""
    margin = overlap * scale * MARGIN  # output pixels next to an inner edge that get no weight
    ramp = max(overlap * scale - 2 * margin, 1)
    weights, total = [], torch.zeros(length * scale)
    for a, b in sides:
        t = torch.arange(a * scale, b * scale, dtype=torch.float32) + 0.5  # pixel centres
        up = (t - a * scale - margin) / ramp if a > 0 else torch.full_like(t, 1.0)  # none at the picture's edges
        down = (b * scale - t - margin) / ramp if b < length else torch.full_like(t, 1.0)
        w = torch.minimum(up, down).clamp(1e-6, 1.0)
        total[a * scale:b * scale] += w
        weights.append(w)
    return [w / total[a * scale:b * scale] for w, (a, b) in zip(weights, sides)]


def _flush(rows: torch.Tensor, out: np.ndarray, top: int):
    """Finished output rows ([1, 3, n, W] float, rounded in place: they are not needed again) into `out` from row
    `top`, as uint8 rounded as spandrel and A1111 do."""
    rows = rows[0].clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    out[top:top + rows.shape[1]] = rows.permute(1, 2, 0).cpu().numpy()


def _tile_row(model, x, acc, y0, y1, xs, wy, wx, scale, bar):
    """Adds one row of tiles, weighted, into the strip `acc` (whose first row is output row y0 · scale)."""
    for (x0, x1), w in zip(xs, wx):
        tile = x[..., y0:y1, x0:x1].to(model.dtype) / 255
        out = model(tile).float()
        if out.shape[-2:] != ((y1 - y0) * scale, (x1 - x0) * scale):
            raise RuntimeError(f"{model.name}: a {x1 - x0}x{y1 - y0} tile came out {out.shape[-1]}x{out.shape[-2]}, "
                               f"not {scale}x")
        acc[..., :out.shape[-2], x0 * scale:x1 * scale] += out.mul_(wy[:, None]).mul_(w)
        bar.update(1)


@torch.no_grad()
def upscale_pixels(model, pixels: np.ndarray, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                   progress: bool = False) -> np.ndarray:
    """`pixels` ([H, W, 3] uint8) through `model` (on its own device and dtype), tile by tile: [sH, sW, 3] uint8."""
    if tile and not 0 <= overlap < tile // 2:
        raise ValueError(f"the tile overlap must be at least 0 and under half the tile ({tile}), not {overlap}")
    scale = model.scale
    device = next(model.parameters()).device
    h, w = pixels.shape[:2]
    ys, xs = spans(h, tile, overlap), spans(w, tile, overlap)
    wy = [r.to(device) for r in ramps(ys, h, scale, overlap)]
    wx = [r.to(device) for r in ramps(xs, w, scale, overlap)]
    x = torch.from_numpy(np.array(pixels)).to(device).permute(2, 0, 1)[None]
    out = np.empty((h * scale, w * scale, 3), np.uint8)
    # one tile row's output rows, reused: rows no later tile touches are flushed, the overlap moves up
    acc = torch.zeros(1, 3, max(b - a for a, b in ys) * scale, w * scale, device=device)
    top, height = 0, 0  # the output row of acc's first row; how many rows of acc are in use
    with tqdm(total=len(ys) * len(xs), desc=f"upscaling ({model.name})", unit="tile", disable=not progress,
              leave=False) as bar:
        for (y0, y1), r in zip(ys, wy):
            done = y0 * scale - top  # rows above this tile row: final
            _flush(acc[..., :done, :], out, top)
            keep = height - done
            acc[..., :keep, :] = acc[..., done:height, :].clone()
            acc[..., keep:, :] = 0
            top, height = y0 * scale, (y1 - y0) * scale
            _tile_row(model, x, acc, y0, y1, xs, r, wx, scale, bar)
    _flush(acc[..., :height, :], out, top)
    return out
