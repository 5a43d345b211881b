"""kiln's upscaler networks against spandrel's (the library ComfyUI and chaiNNer use), in plain PyTorch, on the same
file and the same input: images/s of each and the ratio, in one run.

    python benchmarks/upscale_bench.py [--arch esrgan compact swinir dat] [--size 32] [--iters 3] [--device cpu]
                                       [--dtype fp32|fp16|bf16] [--threads N] [--small]

Each architecture gets random weights at the size of the files people use (ESRGAN: RealESRGAN_x4plus, 23 blocks of
64 features; compact: realesr-general-x4v3; SwinIR: classical 4x, 180 dims, 6x6 blocks; DAT: DAT 4x, 180 dims, 6x6
blocks), written with spandrel's own class (its tensor names); kiln (`load_upscaler`) and spandrel (its own
detection) load that file. The runs alternate kiln and spandrel (the fastest of --iters, after one warm-up each), so
a machine's drift hits both. kiln is run as loaded and in channels-last memory format (what `kiln.pipeline.upscalers`
uses where it pays). spandrel needs tests/upscaler_ref.py's import (no torchvision): pip install --no-deps spandrel
einops. --small: tiny networks (a smoke test of the script)."""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import upscaler_ref as ref  # noqa: E402

from kiln.checkpoints.upscaler import load_upscaler  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (spandrel's architecture, its class's arguments; the --small ones)
NETS = {
    "esrgan": ("ESRGAN", dict(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4),
               dict(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=4)),
    "compact": ("Compact", dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4),
                dict(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4)),
    "swinir": ("SwinIR", dict(img_size=64, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8,
                              mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle"),
               dict(img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=8, mlp_ratio=2.0,
                    upscale=4, upsampler="pixelshuffle")),
    "dat": ("DAT", dict(img_size=64, embed_dim=180, depth=[6] * 6, num_heads=[6] * 6, split_size=[8, 32],
                        expansion_factor=4.0, upscale=4),
            dict(img_size=64, embed_dim=64, depth=[3, 2], num_heads=[2, 4], split_size=[8, 32],
                 expansion_factor=4.0, upscale=4)),
}


def random_state(net: torch.nn.Module, seed: int = 0) -> dict:
    """The network's state with He-style random parameters (as tests/test_upscaler_models.py; the buffers, such as
    SwinIR's masks and DAT's position biases, as built): the speed does not depend on the values, but NaNs or
    denormals would."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    out = {}
    for k, v in net.state_dict().items():
        if k not in params:
            out[k] = v
            continue
        noise = torch.randn(tuple(v.shape), generator=gen)
        out[k] = (noise * math.sqrt(1.0 / math.prod(v.shape[1:])) if v.dim() >= 2
                  else noise * 0.05 if k.endswith("bias") else 1 + 0.1 * noise)
    return out


def timed(fn, x, iters: int, device) -> list[float]:
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bench(name: str, opt, folder: Path) -> dict:
    arch, big, small = NETS[name]
    net = ref.network(arch, **(small if opt.small else big))
    path = ref.save(random_state(net), folder / f"{name}.safetensors")
    device, dtype = torch.device(opt.device), DTYPES[opt.dtype]
    ours = load_upscaler(path, dtype=dtype, device=str(device))
    desc = ref.spandrel_load(path, arch)
    desc.model.eval().to(device=device, dtype=dtype)
    theirs = lambda inp: ref.spandrel_run(desc, inp)  # its padding to the sizes it needs, its network, the crop
    x = torch.rand(1, 3, opt.size, opt.size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ours_cl = load_upscaler(path, dtype=dtype, device=str(device)).to(memory_format=torch.channels_last)
    runs = {"kiln": (ours, x), "kiln channels-last": (ours_cl, x_cl), "spandrel": (theirs, x)}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        diff = (ours(x).float() - theirs(x).float()).abs().max().item()
        for model, inp in runs.values():
            model(inp)  # warm-up (oneDNN primitive caches, cuDNN autotuning)
        for _ in range(opt.iters):  # alternate, so that drift of the machine hits all alike
            for k, (model, inp) in runs.items():
                times[k] += timed(model, inp, 1, device)
    rate = {k: 1.0 / min(v) for k, v in times.items()}  # the fastest run: least disturbed by other load
    return {"arch": name, "rate": rate, "max_abs_diff": diff}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--size", type=int, default=32, help="input pixels a side (default 32)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="tiny networks: a smoke test of the script")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    print(f"device {opt.device}, {opt.dtype}, input 1x3x{opt.size}x{opt.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fastest of {opt.iters}")
    print(f"{'arch':8} {'kiln img/s':>11} {'kiln CL img/s':>14} {'spandrel img/s':>15} {'kiln/spandrel':>14} "
          f"{'best/spandrel':>14} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as d:
        for name in opt.arch:
            r = bench(name, opt, Path(d))
            k, cl, s = r["rate"]["kiln"], r["rate"]["kiln channels-last"], r["rate"]["spandrel"]
            print(f"{name:8} {k:11.3f} {cl:14.3f} {s:15.3f} {k / s:14.2f} {max(k, cl) / s:14.2f} "
                  f"{r['max_abs_diff']:11.2e}", flush=True)


if __name__ == "__main__":
    main()
