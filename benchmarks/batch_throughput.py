"""Rows per minute of `kiln batch`: in-process vs Ray Data with 1 and 2 workers, on the embedded model.

    python benchmarks/batch_throughput.py [--rows 24] [--steps 20]

Each configuration renders the same rows into a fresh folder; the Ray cluster (local, all cores) is started once
before timing, and actor start-up (model loading) is part of each Ray run, as it is for a user. On a 2-core CPU
two workers cannot beat one process using both cores by much: the ceiling is the core count, not the worker count.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from kiln.demo.report import EMBEDDED
from kiln.distributed.batch import Defaults, run_batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    import ray

    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tmp = Path(tempfile.mkdtemp())
    prompts = tmp / "rows.txt"
    prompts.write_text("".join(f"a red circle on a blue background, variant {i}\n" for i in range(args.rows)))
    runs = [("in-process", dict(use_ray=False)), ("ray, 1 worker", dict(use_ray=True, workers=1)),
            ("ray, 2 workers", dict(use_ray=True, workers=2))]
    results = {}
    for name, kw in runs:
        out = tmp / name.replace(" ", "").replace(",", "")
        t = time.perf_counter()
        s = run_batch(prompts, out, ckpt=str(EMBEDDED), defaults=Defaults(steps=args.steps), progress=False, **kw)
        dt = time.perf_counter() - t
        assert s.ok == args.rows, s
        results[name] = {"seconds": round(dt, 2), "rows_per_minute": round(args.rows / dt * 60, 1)}
    base = results["in-process"]["rows_per_minute"]
    print(f"{args.rows} rows, {args.steps} DDIM steps, 64x64, embedded model, {cores} cores")
    print(f"{'run':<16}{'seconds':>9}{'rows/min':>10}{'vs in-process':>15}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>9.1f}{r['rows_per_minute']:>10.1f}{r['rows_per_minute'] / base:>14.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "steps": args.steps, "cores": cores,
                                               "runs": results}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
