"""kiln eager against kiln --backend openvino, end to end, on the same random full-size SD 1.5 weights.

Each variant runs in a fresh process: load, a first txt2img (for openvino: the compile, with an empty model cache
unless the variant is "-warm", which reuses the cache the variant before it in the same run filled), then the
median of --repeat more (prompt encoding + sampling + VAE decode; Euler, CFG 7.5, one image), its peak RSS, and
the final image as 0–1 floats before quantisation. Results are appended to --out (JSON lines), so variants can be
run one at a time (each under the machine's lock); the table covers every line of the file, with speed ratios
against kiln eager fp32 and max |Δ| of the image against it.

    flock /work/heavy.lock python benchmarks/openvino_backend.py --size 256 --variants eager-f32,ov-f32
    python benchmarks/openvino_backend.py --out ov.jsonl --table       # print the table only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln.cache import cache_dir  # noqa: E402

WEIGHTS = cache_dir("bench", "sd15-random-fp32.safetensors")  # what `kiln bench` writes
PROMPT = "a photograph of an astronaut riding a horse"
VARIANTS = {  # name: (backend, precision)
    "eager-f32": ("torch", "full"), "ov-f32": ("openvino", "full"), "ov-f32-warm": ("openvino", "full"),
    "eager-bf16": ("torch", "autocast"), "ov-bf16": ("openvino", "autocast"), "ov-bf16-warm": ("openvino", "autocast"),
}


def rss_gb() -> float:
    """This process's resident memory now (after the runs: the steady state, compile transients gone)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(opt) -> None:
    """One variant, in this process: prints one JSON line."""
    import torch

    import kiln

    backend, precision = VARIANTS[opt.variant]
    t = time.perf_counter()
    pipe = kiln.load(opt.weights, device="cpu", precision=precision, backend=backend)
    load_s = time.perf_counter() - t

    def once():
        t = time.perf_counter()
        r = pipe.txt2img(PROMPT, steps=opt.steps, sampler="euler", cfg_scale=7.5, width=opt.size, height=opt.size,
                         seed=42)
        return time.perf_counter() - t, r

    first_s, _ = once()
    runs = [once() for _ in range(opt.repeat)]
    with torch.no_grad():
        image = ((pipe.decode_latents(runs[-1][1].latents).float() + 1) / 2).clamp(0, 1)
    np.save(opt.image, image.permute(0, 2, 3, 1).numpy())
    print("RESULT " + json.dumps({
        "variant": opt.variant, "size": opt.size, "steps": opt.steps, "load_s": load_s, "first_s": first_s,
        "median_s": statistics.median(s for s, _ in runs), "runs_s": [s for s, _ in runs],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_gb": rss_gb(),
        "image": str(opt.image),
        "threads": torch.get_num_threads()}), flush=True)


def run_variants(opt) -> None:
    images = Path(opt.out).with_suffix(".images")
    images.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="kiln-ov-bench-"))  # cold model cache; "-warm" reuses it
    try:
        for name in opt.variants.split(","):
            if name not in VARIANTS:
                sys.exit(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")
            if not name.endswith("-warm"):
                shutil.rmtree(cache / "openvino", ignore_errors=True)
            image = images / f"{name}-{opt.size}.npy"
            cmd = [sys.executable, __file__, "--child", "--variant", name, "--size", str(opt.size), "--steps",
                   str(opt.steps), "--repeat", str(opt.repeat), "--weights", str(opt.weights), "--image", str(image)]
            print(f"openvino_backend: {name} at {opt.size}² …", file=sys.stderr, flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KILN_CACHE": str(cache)})
            lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
            with open(opt.out, "a") as f:
                f.write(lines[-1][len("RESULT "):] + "\n")
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # compiled models: GBs


def table(path) -> str:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    out = []
    for size in sorted({r["size"] for r in rows}):
        group = {r["variant"]: r for r in rows if r["size"] == size}  # the latest line of each variant counts
        ref = group.get("eager-f32")
        ref_image = np.load(ref["image"]) if ref else None
        out += [f"\n{size}x{size}, {next(iter(group.values()))['steps']} Euler steps, CFG 7.5, one image",
                "| variant | load | first call | steady (median) | vs eager f32 | peak RSS | RSS after | image max Δ |",
                "|---|---|---|---|---|---|---|---|"]
        for name in VARIANTS:
            if name not in group:
                continue
            r = group[name]
            ratio = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else "—"
            diff = f"{np.abs(np.load(r['image']) - ref_image).max():.1e}" if ref and name != "eager-f32" else "—"
            runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
            out.append(f"| {name} | {r['load_s']:.1f} s | {r['first_s']:.1f} s | {r['median_s']:.2f} s ({runs}) "
                       f"| {ratio} | {r['peak_rss_gb']:.2f} GB | {r.get('rss_gb', float('nan')):.2f} GB | {diff} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="eager-f32,ov-f32", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--out", default="openvino_backend.jsonl")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt.child:
        return child(opt)
    if not opt.table:
        if not Path(opt.weights).is_file():
            sys.exit(f"{opt.weights}: no such file (kiln bench writes it)")
        run_variants(opt)
    print(table(opt.out))


if __name__ == "__main__":
    main()
