"""Textual-inversion embeddings: A1111 `.pt` (`string_to_param`), `.safetensors` (`emb_params`; SDXL `clip_l` /
`clip_g`) and diffusers `learned_embeds` files. Used in prompts by file name (A1111's convention)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str
    path: str
    vectors: dict  # width → [n, width] tensor (SDXL files carry one per text encoder)
    sha256: str
    step: int | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def _tensors(data, path) -> dict:
    """Candidate vectors by width from a loaded file's contents."""
    found = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim in (1, 2):
            t = t.detach().float().reshape(-1, t.shape[-1])
            found.setdefault(t.shape[-1], t)

    if not isinstance(data, dict):
        raise CheckpointError(f"embedding {path}: not a dictionary")
    if isinstance(data.get("string_to_param"), dict):  # A1111 / original textual inversion
        for t in data["string_to_param"].values():
            add(t)
    for key in ("emb_params", "clip_l", "clip_g"):
        add(data.get(key))
    if not found:  # diffusers learned_embeds: {"<token>": tensor}
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            add(tensors[0])
    if not found:
        raise CheckpointError(f"embedding {path}: no embedding vectors found (expected string_to_param, emb_params, "
                              "clip_l/clip_g or one learned_embeds tensor)")
    return found


def read_embedding(path) -> Embedding:
    from .hashes import addnet_sha256

    from .sources import read_small_file

    path = Path(path)
    data = read_small_file(path, "embedding")
    step = data.get("step") if isinstance(data, dict) and isinstance(data.get("step"), int) else None
    return Embedding(path.stem, str(path.resolve()), _tensors(data, path), addnet_sha256(path), step)


def scan(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                  and folder.resolve() in p.resolve().parents)
