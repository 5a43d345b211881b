"""`kiln eval demo`: prompt adherence of a model on the held-out shapes prompts, judged by the pixel analyzer."""
from __future__ import annotations

from pathlib import Path

from ..samplers import model_default, parse
from .evaluate import score
from .shapes import heldout_prompts

EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "demo.safetensors"


def adherence(pipe, *, sampler="ddim", cfg_scale=5.0, steps=20, seed=0, batch_size=16, prompts=None,
              schedule=None) -> dict:
    """Per-attribute accuracy over the held-out prompts (one image each, seed + prompt index)."""
    prompts = prompts or heldout_prompts()
    texts = [p for p, _ in prompts]
    result = pipe.txt2img(texts, steps=steps, sampler=sampler, schedule=schedule, cfg_scale=cfg_scale, seed=seed,
                          batch_size=batch_size)
    return {**score([(pixels, labels) for pixels, (_, labels) in zip(result.pixels, prompts)]), "n": len(prompts)}


def table(pipe, samplers=("ddim",), scales=(1.0, 5.0), steps=20, seed=0) -> tuple[str, list[dict]]:
    rows = []
    for sampler in samplers:
        for scale in scales:
            rows.append(dict(sampler=sampler, scale=scale, steps=steps,
                             **adherence(pipe, sampler=sampler, cfg_scale=scale, steps=steps, seed=seed)))
    cols = ("color", "background", "shape", "position", "size", "all")
    lines = ["| sampler | steps | scale | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        spec, asked = parse(r["sampler"])
        own = model_default(spec, pipe.cfg.sampler_schedules) if asked is None else None
        label = r["sampler"] + (f" ({own}: the model's default)" if own else "")
        lines.append(f"| {label} | {r['steps']} | {r['scale']:g} | "
                     + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |")
    return "\n".join(lines), rows
