"""Output files named as the CompVis scripts name them, and folders or object stores for `kiln batch`; every file
written atomically (temp file + rename, `write_atomic`)."""
import io
import os
import posixpath
import time
import re
import tempfile
from pathlib import Path

from PIL import Image

from ..errors import KilnError


def png_data(image: Image.Image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def _write_temp(data: bytes, folder: Path) -> Path:
    """The whole file under a temporary name in `folder`, flushed to the disk."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes):
    """The one way kiln writes a file: a temp file in the same folder, then a rename over `path`, so readers never
    see half a file (a crash leaves the old file or none)."""
    os.replace(_write_temp(data, Path(path).parent), path)


def save_png_atomic(image: Image.Image, path: Path, pnginfo=None):
    write_atomic(path, png_data(image, pnginfo))


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

    def _publish(self, image, folder: Path, pattern: str, fmt: str, pnginfo, data: bytes | None = None) -> Path:
        """Write the whole file (a PNG of `image`, or `data`) to a temp file, then hard-link it to the next free
        number. The link fails if the name exists, so concurrent writers never overwrite each other and no
        partial file is ever visible."""
        tmp = _write_temp(png_data(image, pnginfo) if data is None else data, folder)
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

    def save_sample(self, image: Image.Image, pnginfo=None, encoded: tuple[bytes, str] | None = None) -> Path:
        """samples/NNNNN.png, or with `encoded` (bytes, extension: `pnginfo.encode_image`) a file of that type;
        the numbers run on across every type."""
        ext = encoded[1] if encoded else "png"
        return self._publish(image, self.samples, r"(\d{5,})\.(?:png|jpg|webp)", "{:05}." + ext, pnginfo,
                             encoded[0] if encoded else None)

    def save_grid(self, image: Image.Image, pnginfo=None) -> Path:
        return self._publish(image, self.root, r"grid-(\d{4,})\.png", "grid-{:04}.png", pnginfo)

    def save_extra(self, sub: str, name: str, image: Image.Image, pnginfo=None) -> Path:
        """OUTDIR/sub/name (name made by kiln, never by a user), written atomically; replaces an older file."""
        folder = self.root / sub
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        save_png_atomic(image, path, pnginfo)
        return path


class Destination:
    """An output folder that is a local path or any pyarrow filesystem URI (s3://…, gs://…, hdfs://…, file://…),
    as `kiln batch` writes: `images/` made at once."""

    def __init__(self, location: str):
        self.location = str(location)
        if "://" in self.location:
            from pyarrow import fs

            self.fs, self.root = fs.FileSystem.from_uri(self.location)
        else:
            self.fs, self.root = None, str(Path(self.location).resolve())
        self.makedirs("images")

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.fs else os.path.join(self.root, rel)

    def makedirs(self, rel: str):
        if self.fs:
            self.fs.create_dir(self.path(rel), recursive=True)
        else:
            try:
                os.makedirs(self.path(rel), exist_ok=True)
            except OSError as e:
                raise KilnError(f"cannot create {self.path(rel)}: {e.strerror}") from None

    def write_atomic(self, rel: str, data: bytes):
        """Readers never see a partial file: write a temp name, then rename over the final one."""
        final = self.path(rel)
        if self.fs:
            tmp = self.path(posixpath.join(posixpath.dirname(rel), f".tmp-{os.getpid()}-{time.time_ns()}"))
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        else:
            write_atomic(Path(final), data)

    def sweep(self, rel: str) -> int:
        """Remove the temporary files a killed writer left in folder `rel` (never a finished file: those have
        their final names). Returns how many went."""
        if self.fs:
            from pyarrow import fs

            found = [i.path for i in self.fs.get_file_info(fs.FileSelector(self.path(rel), allow_not_found=True))
                     if posixpath.basename(i.path).startswith(".tmp-")]
            for path in found:
                self.fs.delete_file(path)
            return len(found)
        folder = Path(self.path(rel))
        found = [p for p in folder.glob(".tmp-*") if p.is_file()] if folder.is_dir() else []
        for p in found:
            p.unlink(missing_ok=True)
        return len(found)

    def exists(self, rel: str) -> bool:
        if self.fs:
            from pyarrow import fs

            return self.fs.get_file_info(self.path(rel)).type == fs.FileType.File
        return os.path.isfile(self.path(rel))

    def read(self, rel: str) -> bytes | None:
        if not self.exists(rel):
            return None
        if self.fs:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        with open(self.path(rel), "rb") as f:
            return f.read()

    def append(self, rel: str, text: str):
        if self.fs:  # object stores cannot append: rewrite the whole (small) file
            self.write_atomic(rel, (self.read(rel) or b"") + text.encode("utf-8"))
            return
        with open(self.path(rel), "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
