"""Labelled grids as A1111 draws them (`images.image_grid`, `draw_grid_annotations`: white background, column
labels above, row labels at the left, inactive prompt-matrix parts grey and struck through), and the overlapping
tiles of SD upscale (`split_grid` / `combine_grid`: tiles spread evenly, seams blended linearly over the overlap).
Written from A1111's behaviour, not its code."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND, ACTIVE, INACTIVE = (255, 255, 255), (0, 0, 0), (153, 153, 153)
MIN_FONT = 10  # A1111's (w + h) / 25 is unreadable on small cells (64 px images: 5 px)


@dataclass
class Label:
    text: str
    active: bool = True


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """`rows` rows of cells the size of the largest image, smaller ones centred; no padding."""
    rows = max(1, min(rows, len(images)))
    cols = math.ceil(len(images) / rows)
    w, h = (max(s) for s in zip(*(im.size for im in images)))
    grid = Image.new("RGB", (cols * w, rows * h), BACKGROUND)
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * w + (w - im.width) // 2, i // cols * h + (h - im.height) // 2))
    return grid


def auto_rows(n: int) -> int:
    """A1111's rows for a batch grid (n_rows -1): the square root, rounded."""
    return max(1, min(n, round(math.sqrt(n))))


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _size(draw, text: str, fnt) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def _wrap(draw, label: Label, fnt, width: int) -> list[Label]:
    """The label broken into lines no wider than `width` at word boundaries (a long word keeps its own line)."""
    lines, line = [], ""
    for word in label.text.split():
        longer = f"{line} {word}".strip()
        if line and _size(draw, longer, fnt)[0] > width:
            lines.append(line)
            line = word
        else:
            line = longer
    lines.append(line)
    return [Label(t, label.active) for t in lines]


def annotate(grid: Image.Image, width: int, height: int, hor: list[list[Label]], ver: list[list[Label]],
             margin: int = 0) -> Image.Image:
    """The grid of `width` x `height` cells with `hor` labels above its columns and `ver` labels left of its rows,
    and `margin` pixels between cells."""
    size = max(MIN_FONT, (width + height) // 25)
    spacing = size // 2
    fnt = font(size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = width * 3 // 4 if any(label.text for labels in ver for label in labels) else 0
    cols, rows = grid.width // width, grid.height // height
    hor = [[w for label in labels for w in _wrap(draw, label, fnt, width)] for labels in hor]
    ver = [[w for label in labels for w in _wrap(draw, label, fnt, pad_left)] for labels in ver]

    def block(lines):
        return sum(_size(draw, x.text, fnt)[1] + spacing for x in lines) - spacing if lines else 0

    hor_h = [block(lines) for lines in hor]
    pad_top = max(hor_h) + spacing * 2 if any(hor_h) else 0
    out = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
                    BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            out.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    pen = ImageDraw.Draw(out)
    for col, lines in enumerate(hor[:cols]):
        _draw_lines(pen, lines, pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_h[col] / 2,
                    width, size, spacing)
    for row, lines in enumerate(ver[:rows]):
        _draw_lines(pen, lines, pad_left / 2, pad_top + (height + margin) * row + height / 2 - block(lines) / 2,
                    pad_left, size, spacing)
    return out


def _draw_lines(pen, lines: list[Label], x: float, y: float, allowed: int, size: int, spacing: int):
    """Lines centred on x from y down; a line too wide for `allowed` gets a smaller font."""
    for line in lines:
        fnt, s = font(size), size
        while s > 1 and _size(pen, line.text, fnt)[0] > allowed:
            s -= 1
            fnt = font(s)
        w, h = _size(pen, line.text, font(size))
        if line.text:
            pen.multiline_text((x, y + h / 2), line.text, font=fnt, fill=ACTIVE if line.active else INACTIVE,
                               anchor="mm", align="center")
        if not line.active:
            tw = _size(pen, line.text, fnt)[0]
            pen.line((x - tw // 2, y + h // 2, x + tw // 2, y + h // 2), fill=INACTIVE, width=max(1, s // 6))
        y += h + spacing


# ---------------------------------------------------------------------------------------------- tiles
@dataclass
class Tiles:
    """Where the tiles of a picture lie: columns at `xs`, rows at `ys`, each tile_w x tile_h."""
    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    xs: list[int]
    ys: list[int]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: as few tiles as overlap `overlap` at least, spread evenly, the last one
    flush with the far edge (a tile larger than the picture starts at 0 and runs past it)."""
    n = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (n - 1) if n > 1 else 0
    return [max(0, min(int(i * step), size - tile)) for i in range(n)]


def split_tiles(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> tuple[Tiles, list[Image.Image]]:
    tiles = Tiles(image.width, image.height, tile_w, tile_h, overlap, _starts(image.width, tile_w, overlap),
                  _starts(image.height, tile_h, overlap))
    return tiles, [image.crop(box) for box in tiles.boxes]  # beyond the picture: black


def combine_tiles(tiles: Tiles, images: list[Image.Image]) -> Image.Image:
    """The picture from its tiles (in `boxes` order): each row is laid left to right and each row below the one
    above, a tile's first `overlap` pixels blended linearly into what is there, the rest laid over it."""
    w, h, o = tiles.width, tiles.height, tiles.overlap
    out = np.zeros((h, w, 3), np.float32)
    ramp_x = (np.arange(o, dtype=np.float32) / max(o, 1))[None, :, None]
    ramp_y = (np.arange(o, dtype=np.float32) / max(o, 1))[:, None, None]
    it = iter(images)
    for r, y in enumerate(tiles.ys):
        row = np.zeros((tiles.tile_h, w, 3), np.float32)
        for c, x in enumerate(tiles.xs):
            tile = np.asarray(next(it).convert("RGB"), np.float32)[:, :w - x]
            _lay(row, tile, x, o if c else 0, ramp_x, axis=1)
        _lay(out, row[:h - y], y, o if r else 0, ramp_y, axis=0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _lay(dst: np.ndarray, src: np.ndarray, at: int, blend: int, ramp: np.ndarray, axis: int):
    """src into dst from `at` along `axis`: its first `blend` pixels mixed in by `ramp`, the rest copied."""
    n = src.shape[axis]
    blend = min(blend, n)
    if axis == 1:
        old = dst[:, at:at + blend]
        dst[:, at:at + blend] = old + (src[:, :blend] - old) * ramp[:, :blend]
        dst[:, at + blend:at + n] = src[:, blend:]
    else:
        old = dst[at:at + blend]
        dst[at:at + blend] = old + (src[:blend] - old) * ramp[:blend]
        dst[at + blend:at + n] = src[blend:]
