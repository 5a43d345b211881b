"""Model hashes as A1111 shows them, computed once per file version and cached.

- AutoV2: the first 10 hex digits of the file's SHA-256 (A1111's "Model hash" since 2023).
- legacy: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (A1111's old `model_hash`).
A diffusers folder has no single file; its hash is over its weight files in name order.

The full SHA-256 of a 4 GB file takes tens of seconds, so it is cached in a JSON file beside the checkpoint
(`NAME.kiln-hash.json`) or, when that folder is not writable, in `~/.cache/kiln/hashes.json`; an entry is valid
only for the same size and modification time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def legacy_hash(path: str | Path) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".ckpt"))


def _stamp(path: Path) -> dict:
    files = _weight_files(path) if path.is_dir() else [path]
    return {"size": sum(p.stat().st_size for p in files), "mtime": max(p.stat().st_mtime_ns for p in files)}


def _user_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kiln" / "hashes.json"


def _read(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def _write(file: Path, data: dict) -> bool:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(file)
        return True
    except OSError:
        return False


def full_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint file (or of a diffusers folder's weight files), cached by size and mtime."""
    path = Path(path).resolve()
    stamp = _stamp(path)
    beside = path.with_name(path.name + ".kiln-hash.json")
    user = _user_cache()
    key = str(path)
    for entry in (_read(beside), _read(user).get(key, {})):  # the cache beside the file, then the user's
        if entry.get("size") == stamp["size"] and entry.get("mtime") == stamp["mtime"] and entry.get("sha256"):
            return entry["sha256"]
    if path.is_dir():
        h = hashlib.sha256()
        for p in _weight_files(path):
            h.update(sha256_file(p).encode())
        digest = h.hexdigest()
    else:
        digest = sha256_file(path)
    entry = {**stamp, "sha256": digest}
    if not _write(beside, entry):
        data = _read(user)
        data[key] = entry
        _write(user, data)
    return digest


def autov2(path: str | Path) -> str:
    return full_sha256(path)[:10]


def addnet_sha256(path: str | Path) -> str:
    """A1111's LoRA hash of a .safetensors file (Civitai's AutoV3): SHA-256 of the tensor data after the header,
    so that editing the metadata does not change it. Other files: the SHA-256 of the whole file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return full_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
