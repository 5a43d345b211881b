"""Image grids laid out as torchvision's `make_grid` (padding 2, black), which the CompVis scripts use."""
import math

import numpy as np


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """[N, H, W, 3] uint8 → one [rows·(H+p)+p, cols·(W+p)+p, 3] image, `nrow` images per row."""
    n, h, w, c = images.shape
    cols = min(max(nrow, 1), n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[top:top + h, left:left + w] = images[k]
    return grid
