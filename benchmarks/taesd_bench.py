"""TAESD against the full VAE at 512x512 on this machine's CPU, and what TAESD previews add to a sampling step.

    python benchmarks/taesd_bench.py [--steps 4] [--threads N] [--json FILE]

The model is a full-size SD 1.5 with random weights, built in memory (fp32, convolution weights pre-packed for
oneDNN, as `kiln.load` runs an fp32 file on a CPU); the decoders' speed does not depend on the weights' values.
Every timing is one run after one warm-up run (the warm-up packs the weights at the image size):

1. one 512x512 image decoded from 64x64 latents by the VAE and by TAESD: seconds each and the ratio;
2. a txt2img at 512x512 (Euler, CFG 7.5: two UNet rows per step) without previews, with a TAESD preview after
   every step turned into PNG bytes as the server's worker does, and with those previews under the server's budget
   (`kiln.server.worker.PREVIEW_SHARE`): the extra seconds per step over a plain step (target: at most 5 %),
   beside one preview's own cost measured alone (decode + PNG).
"""
import argparse
import json
import time
from pathlib import Path

import torch


def random_pipeline():
    from kiln.checkpoints import LoadInfo
    from kiln.models import LatentDiffusion, ModelConfig
    from kiln.models.conv import prepack
    from kiln.pipeline.model import Pipeline

    torch.manual_seed(0)
    cfg = ModelConfig()
    model = LatentDiffusion(cfg).eval().requires_grad_(False)
    prepack(model, True)
    pipe = Pipeline(model, LoadInfo("random-sd15", cfg, False), torch.device("cpu"), torch.float32, "full")
    pipe.hash_models = False
    return pipe


def random_taesd(pipe):
    from kiln.checkpoints.taesd import TinyAutoencoder
    from kiln.models.taesd import TAESDDecoder

    tiny = TinyAutoencoder(TAESDDecoder().eval().requires_grad_(False), "decoder", "sd", "taesd_decoder")
    pipe.tiny_decoders["random"] = tiny
    return tiny


def timed(fn, warm=True):
    if warm:
        fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_times(pipe, tiny) -> dict:
    from kiln.pipeline.decoders import tiny_decode

    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    vae = timed(lambda: pipe.decode_latents(z, tile="off"))
    taesd = timed(lambda: tiny_decode(tiny, z))
    return {"vae_s": round(vae, 3), "taesd_s": round(taesd, 3), "vae_over_taesd": round(vae / taesd, 1)}


def preview_cost(tiny) -> float:
    """One preview alone: TAESD decode of a 64x64 latent and the PNG the server keeps."""
    from kiln.output import png_bytes
    from kiln.pipeline.decoders import tiny_previews

    x0 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    return timed(lambda: png_bytes(tiny_previews(tiny, x0)[0]))


def step_times(pipe, tiny, steps: int) -> dict:
    """Seconds of a txt2img without previews, with a TAESD preview (+ PNG) after every step, and with them under
    the server's budget (`PREVIEW_SHARE`)."""
    from kiln.output import png_bytes
    from kiln.server.worker import PREVIEW_SHARE

    kw = dict(steps=steps, sampler="euler", width=512, height=512, seed=1, watermark=False, cfg_scale=7.5)
    pipe.txt2img("a castle", **dict(kw, steps=1))  # warm-up: packs the UNet's weights at this size
    out = {"steps": steps}
    for name, share in (("plain", None), ("every_step", 0.0), ("server_budget", PREVIEW_SHARE)):
        made = []
        hooks = {} if share is None else dict(preview_every=1, preview_share=share,
                                              on_preview=lambda i, n, ims, s, made=made: made.append(png_bytes(ims[0])))
        pipe.preview_decoder = None if share is None else tiny
        started = time.perf_counter()
        pipe.txt2img("a castle", **kw, **hooks)
        out[name] = {"seconds": round(time.perf_counter() - started, 2), "previews": len(made)}
    pipe.preview_decoder = None
    step = out["plain"]["seconds"] / steps  # the final VAE decode is in every run; small beside the steps
    out["step_s"] = round(step, 2)
    for name in ("every_step", "server_budget"):
        extra = (out[name]["seconds"] - out["plain"]["seconds"]) / steps
        out[name].update(extra_per_step_s=round(extra, 3), extra_per_step_pct=round(100 * extra / step, 1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pipe = random_pipeline()
    tiny = random_taesd(pipe)
    out = {"threads": torch.get_num_threads(), "decode_512": decode_times(pipe, tiny)}
    out["preview_alone_s"] = round(preview_cost(tiny), 3)
    out["sampling_512"] = step_times(pipe, tiny, args.steps)
    d, s = out["decode_512"], out["sampling_512"]
    print(f"CPU, {out['threads']} threads, SD 1.5 (random weights, fp32), 512x512")
    print(f"decode: VAE {d['vae_s']:.2f} s, TAESD {d['taesd_s']:.3f} s: TAESD is {d['vae_over_taesd']}x faster")
    print(f"one preview alone (TAESD decode + PNG): {out['preview_alone_s']:.3f} s, "
          f"{100 * out['preview_alone_s'] / s['step_s']:.1f} % of a {s['step_s']:.2f} s step")
    for name in ("every_step", "server_budget"):
        r = s[name]
        print(f"{name}: {r['previews']} previews in {s['steps']} steps add {r['extra_per_step_s']:.3f} s a step "
              f"({r['extra_per_step_pct']} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
