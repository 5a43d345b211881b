"""Output files named as the CompVis scripts name them, written atomically (temp file + rename)."""
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from ..errors import KilnError


def _write_temp(image: Image.Image, folder: Path, pnginfo=None) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def save_png_atomic(image: Image.Image, path: Path, pnginfo=None):
    """Write to a temp file in the same folder, then rename: readers never see a half-written PNG."""
    os.replace(_write_temp(image, path.parent, pnginfo), path)


class OutputDir:
    """`OUTDIR/samples/00000.png …` numbered on from what is there, and `OUTDIR/grid-0000.png …`."""

    def __init__(self, outdir, make_samples=True):
        self.root = Path(outdir)
        self.samples = self.root / "samples"
        try:
            (self.samples if make_samples else self.root).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KilnError(f"cannot create the output folder {self.root}: {e.strerror}") from None
        for d in (self.samples if make_samples else self.root, self.root):
            if not os.access(d, os.W_OK | os.X_OK):
                raise KilnError(f"the output folder {d} is not writable")

    @staticmethod
    def _next(folder: Path, pattern: str) -> int:
        nums = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))] if folder.is_dir() else []
        return max(nums, default=-1) + 1

    def _publish(self, image, folder: Path, pattern: str, fmt: str, pnginfo) -> Path:
        """Write the whole PNG to a temp file, then hard-link it to the next free number. The link fails if
        the name exists, so concurrent writers never overwrite each other and no partial file is ever visible."""
        tmp = _write_temp(image, folder, pnginfo)
        try:
            n = self._next(folder, pattern)
            while True:
                path = folder / fmt.format(n)
                try:
                    os.link(tmp, path)
                    return path
                except FileExistsError:
                    n += 1
        finally:
            tmp.unlink(missing_ok=True)

    def save_sample(self, image: Image.Image, pnginfo=None) -> Path:
        return self._publish(image, self.samples, r"(\d{5,})\.png", "{:05}.png", pnginfo)

    def save_grid(self, image: Image.Image, pnginfo=None) -> Path:
        return self._publish(image, self.root, r"grid-(\d{4,})\.png", "grid-{:04}.png", pnginfo)

    def save_extra(self, sub: str, name: str, image: Image.Image, pnginfo=None) -> Path:
        """OUTDIR/sub/name (name made by kiln, never by a user), written atomically; replaces an older file."""
        folder = self.root / sub
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        save_png_atomic(image, path, pnginfo)
        return path
