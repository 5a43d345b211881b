"""`kiln eval demo-controlnet`: does the demo ControlNet make the demo model draw the shape the control image
outlines, where it is, while the prompt still decides the colors? Judged by the pixel analyzer.

Each case is a held-out (color, shape, background) combination at a position and size (`shapes.heldout_prompts`,
44 cases); its prompt names the colors only ("a red shape on a white background": the shape and its place must come
from the control image), and its control image is the canny map of that shape rendered with the data's jitter (white
outline on black, as sd-webui-controlnet's canny gives). The same prompts without the ControlNet show what the
prompt alone does: position then agrees at chance (about 1 in 5)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import KilnError
from ..pipeline.control import ControlUnit
from .evaluate import analyze
from .shapes import Labels, _fill, heldout_prompts, render
from .train_controlnet import edge_map

PROMPT = "a {color} shape on a {bg} background"
EMBEDDED_CONTROLNET = Path(__file__).resolve().parent.parent / "assets" / "demo_controlnet.safetensors"
FROM_CONTROL = ("shape", "position", "size")
FROM_PROMPT = ("color", "background")


@dataclass
class Case:
    prompt: str
    labels: Labels
    control: Image.Image  # 64×64 RGB canny map


def cases(n: int = 44, seed: int = 0) -> list[Case]:
    """The first `n` (1–44) evaluation cases; `seed` draws the rendering jitter of the control images."""
    targets = [labels for _, labels in heldout_prompts()]
    if not 1 <= n <= len(targets):
        raise KilnError(f"the demo ControlNet evaluation has 1 to {len(targets)} cases, not {n}")
    out = []
    for i, labels in enumerate(targets[:n]):
        shape_image = render(labels, np.random.default_rng([seed, i]))
        out.append(Case(_fill(PROMPT, labels), labels, Image.fromarray(edge_map(shape_image)).convert("RGB")))
    return out


def judge(pixels: list[np.ndarray], chosen: list[Case]) -> dict:
    """Per-attribute agreement: shape, position and size with the control image's, the colors with the prompt's;
    "shape+position" both at once, "all" all five."""
    hits = {k: 0 for k in (*FROM_CONTROL, *FROM_PROMPT, "shape+position", "all")}
    for image, case in zip(pixels, chosen):
        got = analyze(image)
        ok = {k: getattr(got, k) == getattr(case.labels, k) for k in (*FROM_CONTROL, *FROM_PROMPT)}
        hits.update({k: hits[k] + ok[k] for k in ok})
        hits["shape+position"] += ok["shape"] and ok["position"]
        hits["all"] += all(ok.values())
    return {**{k: v / len(chosen) for k, v in hits.items()}, "n": len(chosen)}


def adherence(pipe, controlnet=None, *, n: int = 44, steps: int = 20, sampler: str = "ddim", cfg_scale: float = 5.0,
              seed: int = 0, weight: float = 1.0) -> dict:
    """`judge` over the first `n` cases, one image each (seed + case index), with `controlnet` (a file or a loaded
    ControlNet) steering at `weight`, or with the prompt alone (None)."""
    chosen = cases(n, seed)
    pixels = []
    for i, case in enumerate(chosen):
        units = [ControlUnit(controlnet, case.control, weight=weight)] if controlnet is not None else []
        result = pipe.txt2img(case.prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed + i,
                              controlnets=units)
        pixels.append(result.pixels[0])
    return judge(pixels, chosen)


def table(pipe, controlnet, **kw) -> tuple[str, list[dict]]:
    """A markdown table of `adherence` with the ControlNet and without it."""
    cols = (*FROM_CONTROL, "shape+position", *FROM_PROMPT, "all")
    rows = [dict(run="with the ControlNet", **adherence(pipe, controlnet, **kw)),
            dict(run="prompt alone", **adherence(pipe, None, **kw))]
    lines = ["| run | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [f"| {r['run']} | {r['n']} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |" for r in rows]
    return "\n".join(lines), rows
