"""Where kiln's CPU time goes: a per-stage and per-op-kind profile of one SD 1.5 generation (issue #34).

    python benchmarks/stage_profile.py --size 256 --precision full   # random full-size SD 1.5 (kiln bench's file)
    python benchmarks/stage_profile.py --size 512 --precision autocast --json prof.json
    python benchmarks/stage_profile.py --size 256 --backend openvino        # the same stages through OpenVINO

Stages (median of --repeat after one warm-up, prompt encoding and decode as a generation runs them): the text
encoder (prompt + empty negative), one CFG UNet step (batch 2), the VAE decode. Then torch.profiler over one UNet
step and one decode, self CPU time summed by op kind (convolution, attention, group norm, linear/GEMM,
elementwise, layout copies, other), and wall time by UNet block kind (forward hooks); with `--backend openvino` the
stages only (OpenVINO's kernels are out of torch.profiler's sight), after a first call that compiles each stage.
Run it alone: two torch processes on 2 cores thrash.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# aten op name fragments → kind (first match wins; order matters: "convolution" before "add")
KINDS = [("attention", ("scaled_dot_product", "flash_attention", "softmax", "baddbmm", "bmm")),
         ("convolution", ("convolution", "conv2d", "mkldnn_conv", "kiln::", "packed")),
         ("group norm", ("group_norm",)), ("layer norm", ("layer_norm",)),
         ("linear/GEMM", ("addmm", "aten::mm", "matmul", "linear")),
         ("layout copies", ("copy_", "contiguous", "clone", "to_dense", "reorder", "cat", "upsample", "pad")),
         ("elementwise", ("add", "mul", "silu", "gelu", "sigmoid", "div", "sub", "chunk", "exp", "where", "neg"))]


def kind_of(op: str) -> str:
    for kind, parts in KINDS:
        if any(p in op for p in parts):
            return kind
    return "other"


def op_kinds(fn) -> dict[str, float]:
    """Self CPU seconds by op kind over one call of `fn` (ops nested in others are counted once, as self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        out[kind_of(ev.key)] += ev.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def block_times(unet, fn) -> dict[str, float]:
    """Wall seconds by UNet block kind over one call (hooks on the outermost ResBlock/attention/sampling layers)."""
    spent: dict[str, float] = defaultdict(float)
    starts, hooks = {}, []
    for name, mod in unet.named_modules():
        kind = type(mod).__name__
        if kind not in ("ResBlock", "SpatialTransformer", "Downsample", "Upsample"):
            continue
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
        hooks.append(mod.register_forward_hook(
            lambda m, a, r, n=name, k=kind: spent.__setitem__(k, spent[k] + time.perf_counter() - starts[n])))
    try:
        t = time.perf_counter()
        fn()
        total = time.perf_counter() - t
    finally:
        for h in hooks:
            h.remove()
    spent["rest (embeddings, in/out layers, glue)"] = total - sum(spent.values())
    return dict(spent)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a CompVis SD 1.x file (default: kiln bench's random weights)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--precision", default="full", choices=("full", "autocast"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--backend", default="torch", choices=("torch", "openvino"))
    p.add_argument("--json", default=None)
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    from kiln.bench import PROMPT, _timed, cache_dir, random_weights
    from kiln.pipeline import generators, load, randn

    weights = opt.weights or random_weights(cache_dir() / "sd15-random-fp32.safetensors")
    t = time.perf_counter()
    pipe = load(str(weights), device="cpu", precision=opt.precision, backend=opt.backend)
    load_s = time.perf_counter() - t
    h = w = opt.size // 8
    with torch.no_grad():
        cond, uncond = pipe.conditioning([PROMPT], [""])
        eps_fn = pipe.eps_fn(cond, uncond, 7.5)
        x = randn((4, h, w), generators([1]), torch.device("cpu"))
        cpu = torch.device("cpu")  # kiln bench's timer: one warm-up call, then the median of `repeat`
        stages = {"text encoder (prompt + negative)": _timed(lambda: pipe.conditioning([PROMPT], [""]), opt.repeat,
                                                             cpu),
                  "UNet step (CFG, batch 2)": _timed(lambda: eps_fn(x, 500), opt.repeat, cpu),
                  "VAE decode": _timed(lambda: pipe.decode_latents(x), opt.repeat, cpu)}
        torch_only = opt.backend == "torch"
        unet_ops = op_kinds(lambda: eps_fn(x, 500)) if torch_only else {}
        vae_ops = op_kinds(lambda: pipe.decode_latents(x)) if torch_only else {}
        blocks = block_times(pipe.model.unet, lambda: eps_fn(x, 500)) if torch_only else {}
    report = {"size": opt.size, "precision": opt.precision, "backend": opt.backend, "compute_dtype": str(pipe.dtype),
              "threads": torch.get_num_threads(), "load_s": load_s, "stages_s": stages,
              "unet_step_by_op_kind_s": unet_ops, "vae_decode_by_op_kind_s": vae_ops,
              "unet_step_by_block_kind_s": blocks}
    print(f"kiln stage profile: SD 1.5 {opt.size}x{opt.size}, backend {opt.backend}, precision {opt.precision}, "
          f"{report['threads']} threads, load {load_s:.1f} s")
    for title, table in (("stages (median)", stages), ("UNet step, self CPU time by op kind", unet_ops),
                         ("VAE decode, self CPU time by op kind", vae_ops),
                         ("UNet step, wall time by block kind", blocks)):
        if not table:
            continue
        total = sum(table.values())
        print(f"\n{title}:")
        for k, v in table.items():
            print(f"  {k:42} {v:8.3f} s  {100 * v / total:5.1f}%")
    if opt.json:
        Path(opt.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
