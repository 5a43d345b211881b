"""Run the safety checker on finished images and replace the flagged ones with black images (as the CompVis
scripts and diffusers do: the flagged picture is not kept anywhere)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 [B, H, W, 3] → CLIP input [B, 3, size, size]: shortest side to `size` (bicubic), centre crop,
    scale to [0, 1], normalise with CLIP's mean and std (CLIPImageProcessor's defaults)."""
    out = []
    for p in pixels:
        im = Image.fromarray(p)
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((a - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@dataclass
class SafetyResult:
    pixels: np.ndarray        # the images with flagged ones replaced by black
    flagged: list[bool]
    concept_scores: np.ndarray


def check_images(checker, pixels: np.ndarray, device="cpu", dtype=torch.float32) -> SafetyResult:
    x = clip_preprocess(pixels, checker.cfg.image_size).to(device, dtype)
    flagged, scores, _ = checker(x)
    flagged = flagged.cpu().tolist()
    out = pixels.copy()
    for i, f in enumerate(flagged):
        if f:
            out[i] = 0
    return SafetyResult(out, flagged, scores.cpu().numpy())
