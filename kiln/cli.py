"""`kiln` command line: CompVis' script flags, same spellings and defaults, plus the modern options."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import KilnError

COMPVIS_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
COMPVIS_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def txt2img_parser(sub):
    p = sub.add_parser("txt2img", help="generate images from a text prompt",
                       description="Generate images from text (flags as CompVis' scripts/txt2img.py).")
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", type=str, default="",
                   help="replaces the empty unconditional prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    p.add_argument("--sampler", type=str, default=None, help="sampler: ddim (default) or plms")
    p.add_argument("--fixed_code", action="store_true", help="reuse the first iteration's start codes for every iteration")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size, 512 for SD v1)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size, 512 for SD v1)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's, 4 for SD v1)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD v1)")
    p.add_argument("--n_samples", type=int, default=3, help="how many samples per prompt (batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--config", type=str, default=None, help=f"CompVis model yaml (default: detected from the weights; "
                                                            f"{COMPVIS_CONFIG} is used when present)")
    p.add_argument("--ckpt", type=str, default=None,
                   help=f"weights: CompVis .ckpt/.safetensors or a diffusers folder (default: {COMPVIS_CKPT})")
    p.add_argument("--seed", type=int, default=42, help="image i of the run uses seed + i")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="full = fp32; autocast = fp16 on CUDA/MPS, bf16 on CPUs with native bf16 (else fp32)")
    p.add_argument("--ema", choices=["auto", "on", "off"], default="auto", help="use the file's EMA weights (auto: when present)")
    p.add_argument("--vae", type=str, default=None, help="a separate VAE file (CompVis layout, e.g. the ft-MSE VAE)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--no-watermark", dest="no_watermark", action="store_true", help="do not add the invisible watermark")
    return p


def read_prompts(opt) -> list[str]:
    if not opt.from_file:
        return [opt.prompt] * opt.n_samples
    try:
        with open(opt.from_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except OSError as e:
        raise KilnError(f"--from-file {opt.from_file}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise KilnError(f"--from-file {opt.from_file}: not a UTF-8 text file") from None
    lines = [line for line in lines if line]
    if not lines:
        raise KilnError(f"--from-file {opt.from_file}: holds no prompts")
    return lines


def resolve_ckpt(opt) -> str:
    """--ckpt, else CompVis' default path when it exists, else the embedded demo model."""
    from .demo.report import EMBEDDED

    if opt.ckpt:
        return opt.ckpt
    if Path(COMPVIS_CKPT).exists():
        return COMPVIS_CKPT
    if EMBEDDED.exists():
        say("kiln: no --ckpt given: using the embedded demo model (64x64 shapes; pass --ckpt for a real checkpoint)")
        return str(EMBEDDED)
    raise KilnError(f"no --ckpt given, {COMPVIS_CKPT} does not exist and the embedded model is missing; "
                    "pass --ckpt FILE (a CompVis .ckpt/.safetensors file or a diffusers folder)")


def run_txt2img(opt):
    import numpy as np
    from PIL import Image

    from .pipeline import load
    from .postprocess import OutputDir, make_grid, put_watermark
    from .postprocess.watermark import can_watermark

    if opt.n_samples < 1 or opt.n_iter < 1:
        raise KilnError(f"--n_samples and --n_iter must be at least 1 (got {opt.n_samples} and {opt.n_iter})")
    for name in ("H", "W"):
        v = getattr(opt, name)
        if v is not None and (v < 8 or v % 8):
            raise KilnError(f"--{name} must be a positive multiple of 8, got {v}")
    sampler = opt.sampler or ("plms" if opt.plms else "ddim")
    if opt.plms and opt.sampler and opt.sampler != "plms":
        raise KilnError(f"--plms contradicts --sampler {opt.sampler}")
    prompts = read_prompts(opt)
    out = OutputDir(opt.outdir)
    config = opt.config or (COMPVIS_CONFIG if not opt.ckpt and Path(COMPVIS_CONFIG).exists() else None)
    ckpt = resolve_ckpt(opt)

    pipe = load(ckpt, device=opt.device, precision=opt.precision, ema=opt.ema, vae=opt.vae, config=config)
    for note in pipe.info.notes:
        say(f"kiln: {note}")
    if opt.C not in (None, pipe.cfg.latent_channels):
        raise KilnError(f"--C {opt.C} does not match the model, whose latents have {pipe.cfg.latent_channels} channels")
    if opt.f not in (None, pipe.cfg.downscale):
        raise KilnError(f"--f {opt.f} does not match the model, whose autoencoder downsamples {pipe.cfg.downscale}x")
    watermark = None if opt.no_watermark else pipe.cfg.watermark
    warned_small = False

    def finish(pixels):
        nonlocal warned_small
        if watermark is None:
            return pixels
        if not can_watermark(pixels):
            if not warned_small:
                say("kiln: images smaller than 256x256 cannot carry the invisible watermark; saved without it")
                warned_small = True
            return pixels
        return put_watermark(pixels, watermark)

    all_pixels = []
    n_batches = opt.n_iter * -(-len(prompts) // opt.n_samples)
    from tqdm.auto import tqdm
    bar = None  # made after the first batch, so that an early error is not printed onto a progress bar
    for result in pipe.txt2img_iter(prompts, negative_prompt=opt.negative_prompt, steps=opt.ddim_steps, sampler=sampler,
                                    cfg_scale=opt.scale, width=opt.W, height=opt.H, seed=opt.seed,
                                    batch_size=opt.n_samples, n_iter=opt.n_iter, eta=opt.ddim_eta,
                                    fixed_code=opt.fixed_code, progress=True):
        if bar is None:
            bar = tqdm(total=n_batches, desc="batches", unit="batch", disable=n_batches == 1)
        if not opt.skip_save:
            for pixels in result.pixels:
                out.save_sample(Image.fromarray(finish(pixels)))
        if not opt.skip_grid:
            all_pixels.append(result.pixels)
        bar.update(1)
    if bar is not None:
        bar.close()
    for note in dict.fromkeys(pipe.notices):
        say(f"kiln: {note}")
    if not opt.skip_grid:
        grid = make_grid(np.concatenate(all_pixels), nrow=opt.n_rows or opt.n_samples)
        out.save_grid(Image.fromarray(finish(grid)))
    say(f"Your samples are ready and waiting for you here:\n{out.root}\n\nEnjoy.")


def train_parser(sub):
    p = sub.add_parser("train", help="train the embedded demo model", description="Train kiln's tiny demo model "
                       "(the SD v1 architecture at a tiny size) on the procedural captioned-shapes data.")
    p.add_argument("what", choices=["demo"])
    p.add_argument("--out", default="kiln-demo.safetensors", help="where to write the trained model")
    p.add_argument("--workdir", default="kiln-demo-train", help="training state (resumable), loss log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="training images to generate")
    p.add_argument("--lr", type=float, default=None, help="UNet/text learning rate (default 1e-3)")
    p.add_argument("--offset-noise", type=float, default=None, help="offset-noise strength (default 0.15)")
    return p


def eval_parser(sub):
    p = sub.add_parser("eval", help="measure prompt adherence of the demo model",
                       description="Generate the held-out shapes prompts and judge them with the pixel analyzer.")
    p.add_argument("what", choices=["demo"])
    p.add_argument("--ckpt", default=None, help="model to evaluate (default: the embedded demo model)")
    p.add_argument("--samplers", default="ddim,plms")
    p.add_argument("--scales", default="1,5")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def run_train(opt):
    from dataclasses import replace

    from .demo.train import Trainer, TrainOptions

    o = TrainOptions(seed=opt.seed)
    for field, value in (("vae_steps", opt.vae_steps), ("unet_steps", opt.unet_steps), ("images", opt.images),
                         ("lr", opt.lr), ("offset_noise", opt.offset_noise)):
        if value is not None:
            if value < (0 if field == "offset_noise" else 1e-12):
                raise KilnError(f"--{field.replace('_', '-')} must be positive")
            o = replace(o, **{field: value})
    Trainer(opt.workdir, o, log=lambda m: say(f"kiln: {m}")).run(Path(opt.out))


def run_eval(opt):
    from .demo.report import EMBEDDED, table
    from .pipeline import load

    pipe = load(opt.ckpt or EMBEDDED, device=opt.device, precision="full")
    try:
        scales = [float(s) for s in opt.scales.split(",")]
    except ValueError:
        raise KilnError(f"--scales must be comma-separated numbers, not {opt.scales!r}") from None
    text, _ = table(pipe, samplers=opt.samplers.split(","), scales=scales, steps=opt.steps, seed=opt.seed)
    print(text)


def build_parser():
    parser = argparse.ArgumentParser(prog="kiln", description="Stable Diffusion in plain, fast, verifiable PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    txt2img_parser(sub)
    train_parser(sub)
    eval_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    opt = parser.parse_args(argv)
    try:
        {"txt2img": run_txt2img, "train": run_train, "eval": run_eval}[opt.command](opt)
    except KilnError as e:
        say(f"kiln: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("kiln: interrupted")
        return 130
    except MemoryError:
        say("kiln: error: out of memory; try fewer --n_samples or a smaller --H/--W")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
