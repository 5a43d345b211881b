"""Every sampler on the embedded model against DDIM at 1000 steps, and prompt adherence at 20 steps.

    python benchmarks/sampler_convergence.py [--steps 100] [--adherence]

Prints, per sampler: mean |Δ| in 0–255 pixel values to DDIM 1000 (4 held-out prompts, scale 5, seed 0, the
sampler's default schedule and the "normal" one), UNet evaluations, wall time; with --adherence the held-out
adherence table at 20 steps, scale 5.
"""
import argparse
import time

import numpy as np

import kiln
from kiln.demo.report import EMBEDDED, adherence
from kiln.demo.shapes import heldout_prompts
from kiln.samplers import SAMPLERS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--adherence", action="store_true")
    opt = ap.parse_args()
    pipe = kiln.load(EMBEDDED, device="cpu")
    prompts = [p for p, _ in heldout_prompts()[::11]]
    kw = dict(cfg_scale=5.0, seed=0, batch_size=len(prompts))
    ref = pipe.txt2img(prompts, sampler="ddim", steps=1000, **kw).pixels.astype(float)
    print(f"| sampler | stochastic | schedule | mean abs diff to DDIM 1000 ({opt.steps} steps) | "
          f"same, normal schedule | UNet evals | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, s in SAMPLERS.items():
        t0 = time.perf_counter()
        out = pipe.txt2img(prompts, sampler=name, steps=opt.steps, **kw).pixels.astype(float)
        dt = time.perf_counter() - t0
        normal = "-"
        if s.kind == "denoise" and s.schedule != "normal":
            o2 = pipe.txt2img(prompts, sampler=name, schedule="normal", steps=opt.steps, **kw).pixels.astype(float)
            normal = f"{np.abs(o2 - ref).mean():.2f}"
        elif s.kind == "denoise":
            normal = f"{np.abs(out - ref).mean():.2f}"
        print(f"| {name} | {'yes' if s.stochastic else 'no'} | {s.schedule if s.kind == 'denoise' else 'CompVis'} | "
              f"{np.abs(out - ref).mean():.2f} | {normal} | {opt.steps * s.evals_per_step} | {dt:.1f} |")
    if opt.adherence:
        cols = ("color", "background", "shape", "position", "size", "all")
        print("\n| sampler (20 steps, scale 5) | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for name in SAMPLERS:
            r = adherence(pipe, sampler=name, cfg_scale=5.0, steps=20, seed=0)
            print(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()
