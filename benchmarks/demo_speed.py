"""Time one 64x64 image, 20 DDIM steps, with the embedded demo model on this machine's CPU.

Prints the median wall time of several runs (after one warm-up) and its ratio to the 2 s budget of the
embedded-model issue. Usage: python benchmarks/demo_speed.py [--runs 5] [--steps 20] [--scale 5]
"""
import argparse
import statistics
import time

import torch

import kiln
from kiln.demo.report import EMBEDDED


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=5.0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    pipe = kiln.load(EMBEDDED, device="cpu", precision="full")
    load = time.perf_counter() - t0
    prompt = "a red circle on a blue background"
    pipe.txt2img(prompt, steps=a.steps, cfg_scale=a.scale)  # warm-up
    times = []
    for i in range(a.runs):
        t0 = time.perf_counter()
        pipe.txt2img(prompt, steps=a.steps, cfg_scale=a.scale, seed=i)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"threads {torch.get_num_threads()}, load {load:.2f} s")
    print(f"one 64x64 image, {a.steps} DDIM steps, scale {a.scale:g}: median {med:.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}); budget 2.0 s, ratio {med / 2.0:.2f}")


if __name__ == "__main__":
    main()
