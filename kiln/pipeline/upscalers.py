"""Every upscaler by the name A1111 lists it: the plain resamplers of `kiln.upscalers` (None, Lanczos, Nearest) and
the model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT files) found in the `--upscaler-dir` folders and, when they
exist, A1111's `models/ESRGAN`, `models/RealESRGAN`, `models/SwinIR` and `models/DAT`; or a path to such a file.

A model upscaler is named by its file stem, as A1111 lists local files; Real-ESRGAN's release files also answer to
the names A1111 gives them ("R-ESRGAN 4x+" is RealESRGAN_x4plus.pth). A model is read once (the first time it is
used) and kept; the models run in overlapping tiles (`upscale.py`) on the device the registry was made for, in
half precision on GPUs."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import upscalers as resamplers
from ..checkpoints.upscaler import SUFFIXES, load_upscaler
from ..errors import KilnError
from .devices import compute_dtype, pick_device
from .upscale import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_pixels

FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")  # A1111's model folders, under models/
# A1111's names for the Real-ESRGAN release files it knows (modules/realesrgan_model.py)
REAL_ESRGAN = {"realesr-general-x4v3": "R-ESRGAN General 4xV3", "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
               "realesr-animevideov3": "R-ESRGAN AnimeVideo", "RealESRGAN_x4plus": "R-ESRGAN 4x+",
               "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B", "RealESRGAN_x2plus": "R-ESRGAN 2x+"}
PASSES = 3  # A1111 runs a model up to three times to reach a scale beyond its own
# Convolution-only networks run channels-last (weights in NHWC; the convolutions follow): ESRGAN 1.09x, compact
# 1.03x their default layout on a CPU (benchmarks/upscale_bench.py, docs/upscalers.md); the transformers keep theirs.
CHANNELS_LAST = ("ESRGAN", "RealESRGAN compact")


@dataclass(frozen=True)
class ModelUpscaler:
    """A model upscaler file, listed under `name`. `scale` is read from the name ("4x-UltraSharp", "x2plus"; 4 when
    it says none) as A1111 lists it; the loaded model knows its true scale."""
    name: str
    path: Path
    kind: str  # the folder it was found in (ESRGAN, RealESRGAN, SwinIR, DAT), or "file" for a path

    @property
    def scale(self) -> int:
        m = re.search(r"(\d)[xX]|[xX](\d)", self.name if self.kind != "RealESRGAN" else self.path.stem)
        return int(m.group(1) or m.group(2)) if m else 4


class Upscalers:
    """The upscalers of one process (a CLI run, a server), with their loaded models."""

    def __init__(self, dirs=(), *, device: str = "auto", precision: str = "auto", tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, models_root: str | Path = "models", progress: bool = False):
        self.dirs = [Path(d) for d in (dirs if isinstance(dirs, (list, tuple)) else [dirs]) if d]
        self.models_root = Path(models_root)
        self.device, self.precision = device, precision
        self.tile, self.overlap, self.progress = tile, overlap, progress
        self._loaded: dict = {}  # (path, size, mtime) -> module
        self._lock = threading.Lock()  # one model load at a time (server threads)
        self._running = threading.Lock()  # one model run at a time: a server's memory holds one run's strip

    def folders(self) -> list[tuple[Path, str]]:
        """(folder, kind): the --upscaler-dir folders first, then A1111's that exist."""
        out = [(d, d.name if d.name in FOLDERS else "ESRGAN") for d in self.dirs]
        return out + [(self.models_root / k, k) for k in FOLDERS if (self.models_root / k).is_dir()]

    def models(self) -> list[ModelUpscaler]:
        """The model upscaler files, folder by folder (--upscaler-dir first) and by path within one, each under its name
        (where two files share a name, the first)."""
        found: dict[str, ModelUpscaler] = {}
        for folder, kind in self.folders():
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            for p in files:
                name = REAL_ESRGAN.get(p.stem, p.stem)
                found.setdefault(name.lower(), ModelUpscaler(name, p, kind))
        return list(found.values())

    def names(self) -> list[str]:
        return [*resamplers.NAMES, *(m.name for m in self.models())]

    def find(self, name: str | None, paths: bool = True) -> str | ModelUpscaler:
        """A resampler's canonical name, or the model upscaler called `name` (case-insensitive), or with `paths` the
        file at that path; a one-line error listing what there is otherwise. (A server takes names only: a request
        never picks a file on the server's disk.)"""
        try:
            return resamplers.find(name)
        except KilnError:
            pass
        key = name.strip().lower()
        for m in self.models():
            if m.name.lower() == key or m.path.stem.lower() == key:
                return m
        path = Path(name)
        if paths and path.suffix.lower() in SUFFIXES and path.is_file():
            return ModelUpscaler(path.stem, path, "file")
        files = f" or the path of an upscaler file ({', '.join(SUFFIXES)})" if paths else ""
        raise KilnError(f"upscaler {name!r} is not available; choose one of {', '.join(self.names())}{files}")

    def canonical(self, name: str | None, paths: bool = True) -> str:
        """The name results record for `name`: a resampler's, a listed model's, or a file's path as given."""
        found = self.find(name, paths)
        return found if isinstance(found, str) else found.name if found.kind != "file" else str(found.path)

    def load(self, m: ModelUpscaler):
        """The loaded model of `m` (read once; read again if the file changed)."""
        stat = m.path.stat()
        key = (str(m.path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._loaded:
                self._loaded = {k: v for k, v in self._loaded.items() if k[0] != key[0]}  # an older version goes
                self._loaded[key] = self._read(m.path)
            return self._loaded[key]

    def _read(self, path: Path):
        device = pick_device(self.device)
        dtype = compute_dtype(self.precision, device)
        model = load_upscaler(path, dtype=dtype, device=str(device))
        if dtype == torch.float16 and not model.supports_half:
            # SwinIR and DAT are not trusted in float16 (spandrel neither runs them so): bfloat16 where the GPU has it
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            model = load_upscaler(path, dtype=torch.bfloat16 if bf16 else torch.float32, device=str(device))
        return model.to(memory_format=torch.channels_last) if model.arch in CHANNELS_LAST else model

    def upscale(self, image: Image.Image, width: int, height: int, name: str | None) -> Image.Image:
        """`image` resized to width x height by the named upscaler. A model runs (up to three times, as A1111) until
        the picture is at least that large, then Lanczos makes it exactly that size."""
        found = self.find(name)
        if isinstance(found, str):
            return resamplers.upscale(image, width, height, found)
        model = self.load(found)
        image = image.convert("RGB")
        for _ in range(PASSES):
            if image.width >= width and image.height >= height:
                break
            with self._running:
                image = Image.fromarray(upscale_pixels(model, np.asarray(image), self.tile, self.overlap,
                                                       self.progress))
        return resamplers.upscale(image, width, height, "Lanczos")
