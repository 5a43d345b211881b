"""Load the safety checker's weights: a diffusers `safety_checker/` folder (or the pipeline folder above it) or a
single .safetensors/.bin file, with `vision_model.vision_model.*` keys (the published files) or the flattened
`vision_model.*` of recent transformers versions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.safety import CLIPVisionConfig, SafetyChecker
from .sources import open_file

PREFIX = "vision_model.vision_model."


def _find_file(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        return path, None
    for folder in (path, path / "safety_checker"):
        for name in ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"):
            if (folder / name).is_file():
                return folder / name, folder / "config.json"
    raise CheckpointError(f"{path}: no safety checker weights found (expected model.safetensors or pytorch_model.bin, "
                          "or a diffusers folder with safety_checker/)")


def load_safety_checker(path, device="cpu", dtype=torch.float32) -> SafetyChecker:
    file, config_file = _find_file(Path(path))
    src = open_file(file)
    keys = list(src.keys())
    rename = {}
    for k in keys:
        if k.startswith("vision_model.") and not k.startswith(PREFIX):
            rename[PREFIX + k[len("vision_model."):]] = k
        elif not k.endswith("position_ids"):
            rename[k] = k
    src = src.renamed(rename)
    try:
        patch = src.shape(PREFIX + "embeddings.patch_embedding.weight")
        n_pos = src.shape(PREFIX + "embeddings.position_embedding.weight")[0]
        proj = src.shape("visual_projection.weight")
        concepts, special = src.shape("concept_embeds")[0], src.shape("special_care_embeds")[0]
    except KeyError as e:
        raise CheckpointError(f"{file}: not a Stable Diffusion safety checker (no {e.args[0]})") from None
    layers = 1 + max(int(k[len(PREFIX + "encoder.layers."):].split(".")[0]) for k in src.keys()
                     if k.startswith(PREFIX + "encoder.layers."))
    width = patch[0]
    heads = width // 64
    if config_file is not None and config_file.is_file():
        try:
            heads = json.loads(config_file.read_text()).get("vision_config", {}).get("num_attention_heads", heads)
        except ValueError:
            pass
    side = math.isqrt(n_pos - 1)
    cfg = CLIPVisionConfig(image_size=side * patch[-1], patch=patch[-1], width=width, layers=layers, heads=heads,
                           mlp_width=src.shape(PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
                           projection_dim=proj[0], concepts=concepts, special=special)
    with torch.device("meta"):
        model = SafetyChecker(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in src]
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} safety checker tensors missing, e.g. {missing[0]}")
    state = {}
    for k, v in expected.items():
        t = src.get(k)
        if tuple(t.shape) != tuple(v.shape):
            raise CheckpointError(f"{file}: {k} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
        state[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()
