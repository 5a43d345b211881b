"""Weight files as lazy key → tensor sources, so a model is filled one tensor at a time (no second copy)."""
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .safe_pickle import load_pickle_checkpoint


class TensorSource:
    """A read-only mapping of names to tensors: `keys()`, `shape(key)`, `get(key)`; `metadata` holds text facts."""

    def __init__(self, shapes: dict, getter, metadata=None, name=""):
        self._shapes, self._get, self.metadata, self.name = shapes, getter, metadata or {}, name

    def keys(self):
        return self._shapes.keys()

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return tuple(self._shapes[key])

    def get(self, key) -> torch.Tensor:
        return self._get(key)

    def renamed(self, mapping: dict, name=None):
        """A view of this source under new names: `mapping` is new name → old name."""
        return TensorSource({new: self._shapes[old] for new, old in mapping.items()},
                            lambda key: self._get(mapping[key]), self.metadata, name or self.name)


def read_small_file(path, what: str) -> dict:
    """The whole content of a small weights file (a LoRA, an embedding): `.safetensors` directly, anything else
    through the restricted unpickler. Errors name `what` and the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{what} {path}: not a readable safetensors file ({e})") from None
    return load_pickle_checkpoint(path)


def _check_safetensors_header(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: the file is truncated ({size:,} bytes, the header describes {8 + n + end:,})")


def open_safetensors(path: Path) -> TensorSource:
    _check_safetensors_header(path)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return TensorSource(shapes, f.get_tensor, meta, str(path))


def open_pickle(path: Path) -> TensorSource:
    obj = load_pickle_checkpoint(path)
    meta = {}
    if isinstance(obj.get("state_dict"), dict):
        if "global_step" in obj:
            meta["global_step"] = str(obj["global_step"])
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; not a model checkpoint")
    return TensorSource({k: v.shape for k, v in tensors.items()}, tensors.__getitem__, meta, str(path))


def open_file(path) -> TensorSource:
    """A single weights file: .safetensors, or a pickled .ckpt/.pt/.pth/.bin (read by the safe unpickler)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weights file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        magic = f.read(8)
    # safetensors starts with a little-endian header length followed by '{'; pickles and zips start otherwise.
    if path.suffix == ".safetensors" or (len(magic) == 8 and not magic.startswith((b"PK", b"\x80"))):
        return open_safetensors(path)
    return open_pickle(path)
