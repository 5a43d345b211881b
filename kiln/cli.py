"""`kiln` command line: CompVis' script flags, same spellings and defaults, plus the modern options."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CheckpointError, KilnError

COMPVIS_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
COMPVIS_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


MODES = {
    # command: (help, description, outdir, n_iter, n_samples, scale)
    "txt2img": ("generate images from a text prompt", "Generate images from text (flags as CompVis' "
                "scripts/txt2img.py).", "outputs/txt2img-samples", 2, 3, 7.5),
    "img2img": ("re-render an image with a prompt", "Re-render an init image guided by a prompt (flags as CompVis' "
                "scripts/img2img.py).", "outputs/img2img-samples", 1, 2, 5.0),
    "inpaint": ("repaint the masked part of an image, or extend it (outpainting)", "Repaint where the mask is white "
                "(or the new borders of --outpaint), keeping the rest.", "outputs/inpainting-samples", 1, 2, 5.0),
}


def txt2img_parser(sub, command="txt2img"):
    help_, description, outdir, n_iter, n_samples, scale = MODES[command]
    p = sub.add_parser(command, help=help_, description=description)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    if command != "txt2img":
        p.add_argument("--init-img", "--init_img", dest="init_img", type=str, required=True,
                       help="the image to start from (any format PIL reads; EXIF rotation applied)")
        p.add_argument("--strength", type=float, default=None,
                       help="how much of the image is re-done: 0 keeps it, 1 ignores it (default 0.75; with "
                            "--outpaint 1.0)")
        p.add_argument("--resize-mode", dest="resize_mode", default="just-resize",
                       choices=["just-resize", "crop-and-resize", "resize-and-fill"],
                       help="how the image is fitted to --W/--H (A1111's resize modes)")
    if command == "inpaint":
        p.add_argument("--mask", type=str, default=None, help="white = repaint, black = keep (grey: blends)")
        p.add_argument("--outpaint", type=str, default=None, metavar="L,R,T,B",
                       help="extend the canvas by these many pixels left, right, top, bottom and paint them")
        p.add_argument("--mask-blur", dest="mask_blur", type=float, default=4.0,
                       help="blur radius (pixels) of the seam where generated and original pixels meet")
        p.add_argument("--inpaint-fill", dest="inpaint_fill", default=None,
                       choices=["original", "fill", "latent-noise", "latent-nothing"],
                       help="what the masked area starts from (default: original; with --outpaint latent-noise)")
        p.add_argument("--inpaint-area", dest="inpaint_area", choices=["whole", "masked"], default="whole",
                       help="masked: render a crop around the mask at full size and paste it back (more detail)")
        p.add_argument("--masked-padding", dest="masked_padding", type=int, default=32,
                       help="pixels of context around the mask for --inpaint-area masked")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", type=str, default="",
                   help="replaces the empty unconditional prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default=outdir)
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    p.add_argument("--sampler", type=str, default=None,
                   help="sampler, our name or A1111's (e.g. dpmpp_2m or \"DPM++ 2M Karras\"); default ddim. "
                        "See `kiln info --samplers`")
    p.add_argument("--schedule", type=str, default=None,
                   help="noise schedule: normal, karras, exponential, sgm_uniform, simple for the k-diffusion "
                        "samplers; normal (CompVis' uniform) or quad (CompVis' quadratic) for ddim and plms "
                        "(default: the sampler's own)")
    p.add_argument("--fixed_code", action="store_true", help="reuse the first iteration's start codes for every iteration")
    p.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None,
                   help="noise of stochastic samplers (DDIM: 0 = deterministic, the default; ancestral/SDE: 1)")
    p.add_argument("--s-noise", dest="s_noise", type=float, default=1.0, help="scale of the injected noise (s_noise)")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=1,
                   help="use the text encoder's hidden state this many layers from the end (1 = last, as A1111)")
    p.add_argument("--save-intermediates", dest="save_intermediates", type=int, nargs="?", const=5, default=0,
                   metavar="EVERY", help="also write the decoded pred_x0 every EVERY steps (default 5) "
                                         "to OUTDIR/intermediates/")
    p.add_argument("--subseed", type=int, default=None, help="variation seed (image i uses subseed + i)")
    p.add_argument("--subseed-strength", dest="subseed_strength", type=float, default=0.0,
                   help="how far towards the variation seed's noise (0 … 1, slerp)")
    p.add_argument("--seed-resize-from", dest="seed_resize_from", type=str, default=None, metavar="WxH",
                   help="keep the composition a seed has at WxH (A1111's 'resize seed from')")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (kohya/A1111, LoCon or diffusers/PEFT file) at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", dest="lora_dir", default=None,
                   help="folder where <lora:name:weight> tags in the prompt are looked up")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual-inversion embeddings (.pt, .bin, .safetensors), used in prompts by file name")
    p.add_argument("--seamless", action="store_true", help="tileable output (circular padding in every convolution)")
    p.add_argument("--tile", choices=["auto", "on", "off"], default="auto",
                   help="UNet and VAE decoder in overlapping tiles (auto: above twice the model's native size)")
    if command == "txt2img":
        p.add_argument("--hires-scale", dest="hires_scale", type=float, default=None,
                       help="hires fix: generate, upscale by this factor, then re-render at the larger size")
        p.add_argument("--hires-upscaler", dest="hires_upscaler", choices=["latent", "lanczos"], default="latent")
        p.add_argument("--hires-steps", dest="hires_steps", type=int, default=None,
                       help="steps of the second pass (default: --ddim_steps)")
        p.add_argument("--hires-strength", dest="hires_strength", type=float, default=0.7,
                       help="denoising strength of the second pass")
        p.add_argument("--refiner", type=str, default=None,
                       help="a second checkpoint (the SDXL refiner) that runs the last steps")
        p.add_argument("--refiner-switch", dest="refiner_switch", type=float, default=0.8,
                       help="fraction of the steps the main model runs before the refiner takes over")
    p.add_argument("--n_iter", type=int, default=n_iter, help="sample this often")
    size_default = "the model's native size, 512 for SD v1" if command == "txt2img" else \
        "the init image's, rounded down to a multiple of 8"
    p.add_argument("--H", type=int, default=None, help=f"image height in pixels (default: {size_default})")
    p.add_argument("--W", type=int, default=None, help=f"image width in pixels (default: {size_default})")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's, 4 for SD v1)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD v1)")
    p.add_argument("--n_samples", type=int, default=n_samples, help="how many samples per prompt (batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=scale, help="classifier-free guidance scale")
    p.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--config", type=str, default=None, help=f"CompVis model yaml (default: detected from the weights; "
                                                            f"{COMPVIS_CONFIG} is used when present)")
    p.add_argument("--ckpt", type=str, default=None,
                   help=f"weights: CompVis .ckpt/.safetensors or a diffusers folder (default: {COMPVIS_CKPT})")
    p.add_argument("--seed", type=int, default=42, help="image i of the run uses seed + i")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="full = fp32; autocast = fp16 on CUDA/MPS, bf16 on CPUs with native bf16 (else fp32)")
    p.add_argument("--ema", choices=["auto", "on", "off"], default="auto", help="use the file's EMA weights (auto: when present)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="what the UNet predicts: eps (noise) or v (SD 2.x 768 models); default: from the yaml beside "
                        "the weights, else detected (SD 2.x: A1111's test on the weights)")
    p.add_argument("--vae", type=str, default=None, help="a separate VAE file (CompVis layout, e.g. the ft-MSE VAE)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE decoder (slow first image; for GPUs: on CPUs the eager "
                        "pre-packed path measured faster; docs/performance.md)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="NHWC convolution weights (the default on CUDA; on CPUs ~10%% faster UNet, +2.7 GB memory)")
    add_memory_flags(p)
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="reuse the UNet's deep features: the whole UNet every N-th call, only its outer blocks between "
                        "(faster, a different image; off by default; docs/performance.md)")
    p.add_argument("--deepcache-depth", dest="deepcache_depth", type=int, default=3, metavar="D",
                   help="how many outer input/output blocks run at the cached steps (default 3)")
    p.add_argument("--no-watermark", dest="no_watermark", action="store_true", help="do not add the invisible watermark")
    p.add_argument("--watermark", type=str, default=None,
                   help="invisible watermark text (default: the model's, \"StableDiffusionV1\" for SD v1)")
    p.add_argument("--metadata-format", dest="metadata_format", choices=["a1111", "json", "none"], default="a1111",
                   help="what each sample PNG records: A1111's \"parameters\" text (default), a JSON "
                        "\"kiln-parameters\" chunk, or nothing")
    p.add_argument("--safety-checker", dest="safety_checker", default=None, metavar="PATH",
                   help="CompVis' NSFW safety checker weights (a diffusers safety_checker folder or file); "
                        "flagged images are replaced by black images")
    p.add_argument("--safety", dest="safety", action="store_true", default=None,
                   help="require the safety check (an error without --safety-checker)")
    p.add_argument("--no-safety", dest="safety", action="store_false", help="do not run the safety checker")
    p.add_argument("--from-png", dest="from_png", type=str, default=None,
                   help="regenerate an image from the parameters stored in it (prompt, seed, sampler, steps, …)")
    return p


def apply_png_parameters(opt):
    """--from-png: every generation parameter from the image; one image, no grid."""
    from .postprocess.infotext import txt2img_kwargs
    from .postprocess.pnginfo import read_parameters

    info = read_parameters(opt.from_png)
    try:
        kw = txt2img_kwargs(info)
    except ValueError as e:
        raise KilnError(f"--from-png {opt.from_png}: {e}") from None
    opt.prompt, opt.negative_prompt = kw["prompt"], kw["negative_prompt"]
    opt.ddim_steps = kw.get("steps", opt.ddim_steps)
    opt.sampler, opt.schedule = kw.get("sampler", opt.sampler), kw.get("schedule", opt.schedule)
    opt.plms = False
    opt.scale = kw.get("cfg_scale", opt.scale)
    opt.seed = kw.get("seed", opt.seed)
    opt.W, opt.H = kw.get("width", opt.W), kw.get("height", opt.H)
    opt.clip_skip = kw.get("clip_skip", 1)
    opt.ddim_eta = kw.get("eta", None)
    opt.s_noise = kw.get("s_noise", 1.0)
    opt.subseed, opt.subseed_strength = kw.get("subseed"), kw.get("subseed_strength", 0.0)
    sr = kw.get("seed_resize_from")
    opt.seed_resize_from = f"{sr[0]}x{sr[1]}" if sr else None
    opt.seamless = kw.get("seamless", False)
    if "Refiner" in info and opt.command == "txt2img":
        try:
            opt.refiner_switch = float(info.get("Refiner switch at", opt.refiner_switch))
        except ValueError:
            raise KilnError(f"--from-png {opt.from_png}: bad Refiner switch at {info['Refiner switch at']!r}") from None
        if not opt.refiner:
            say(f"kiln: note: the image was refined by {info['Refiner']}; pass --refiner FILE to reproduce it")
    if "hires_scale" in kw and opt.command == "txt2img":
        opt.hires_scale, opt.hires_steps = kw["hires_scale"], kw["hires_steps"]
        opt.hires_upscaler, opt.hires_strength = kw["hires_upscaler"], kw["hires_strength"]
    # The image's whole batch is made again (same size, same prompt, consecutive seeds) and only its own
    # position kept: batch size changes the last bit of some pixels, so this is what reproduces it exactly.
    if hasattr(opt, "strength") and "Denoising strength" in info:
        try:
            opt.strength = float(info["Denoising strength"])
        except ValueError:
            raise KilnError(f"--from-png {opt.from_png}: bad Denoising strength {info['Denoising strength']!r}") from None
    opt.n_samples, opt.n_iter, opt.skip_grid, opt.from_file = kw.get("batch_size", 1), 1, True, None
    opt.keep_only = kw.get("batch_pos", 0)
    if not 0 <= opt.keep_only < opt.n_samples:
        raise KilnError(f"--from-png {opt.from_png}: Batch pos {opt.keep_only} is outside Batch size {opt.n_samples}")
    opt.seed -= opt.keep_only
    return info


def parse_size(text, flag):
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise KilnError(f"{flag} must look like 512x768, not {text!r}") from None
    return w, h


def parse_outpaint(text):
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or min(parts) < 0 or max(parts) == 0:
        raise KilnError(f"--outpaint must be four non-negative pixel counts LEFT,RIGHT,TOP,BOTTOM, not {text!r}")
    return tuple(parts)


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


def parse_lora(spec: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` (a path may itself hold colons: the weight is the last part only if it is a number)."""
    path, sep, tail = spec.rpartition(":")
    if sep and tail and not any(c in tail for c in "/\\"):
        try:
            return path, float(tail)
        except ValueError:
            if "." not in tail:
                raise KilnError(f"--lora {spec}: the weight {tail!r} is not a number") from None
    if not Path(spec).is_file():
        raise KilnError(f"--lora {spec}: no such file")
    return spec, 1.0


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
    from .postprocess.pnginfo import pnginfo_for
    from .postprocess.watermark import can_watermark

    png_info = apply_png_parameters(opt) if opt.from_png else None
    if opt.n_samples < 1 or opt.n_iter < 1:
        raise KilnError(f"--n_samples and --n_iter must be at least 1 (got {opt.n_samples} and {opt.n_iter})")
    for name in ("H", "W"):
        v = getattr(opt, name)
        if v is not None and (v < 8 or v % 8):
            raise KilnError(f"--{name} must be a positive multiple of 8, got {v}")
    sampler = opt.sampler or ("plms" if opt.plms else "ddim")
    if opt.plms and opt.sampler and opt.sampler.lower() != "plms":
        raise KilnError(f"--plms contradicts --sampler {opt.sampler}")
    from .samplers import model_default, parse
    try:
        parse(sampler, opt.schedule)
    except ValueError as e:
        raise KilnError(str(e)) from None
    if opt.save_intermediates < 0:
        raise KilnError(f"--save-intermediates must be a positive number of steps, got {opt.save_intermediates}")
    prompts = read_prompts(opt)
    out = OutputDir(opt.outdir)
    config = opt.config or (COMPVIS_CONFIG if not opt.ckpt and Path(COMPVIS_CONFIG).exists() else None)
    ckpt = resolve_ckpt(opt)

    loras = [parse_lora(spec) for spec in opt.lora]
    for path, _ in loras:
        if not Path(path).is_file():
            raise KilnError(f"--lora {path}: no such file")
    if opt.lora_dir and not Path(opt.lora_dir).is_dir():
        raise KilnError(f"--lora-dir {opt.lora_dir}: not a folder")
    if opt.embeddings_dir and not Path(opt.embeddings_dir).is_dir():
        raise KilnError(f"--embeddings-dir {opt.embeddings_dir}: not a folder")
    if getattr(opt, "refiner", None) and not Path(opt.refiner).exists():
        raise KilnError(f"--refiner {opt.refiner}: no such file or folder")
    pipe = load(ckpt, device=opt.device, precision=opt.precision, ema=opt.ema, vae=opt.vae, config=config,
                prediction=opt.prediction, channels_last=opt.channels_last, prepack=PREPACK[opt.prepack],
                offload=opt.offload)
    if opt.compile:
        say("kiln: compiling the UNet and VAE decoder (the first image takes longer)")
        pipe.compile()
    if opt.deepcache:
        pipe.set_deepcache(opt.deepcache, opt.deepcache_depth)
    if getattr(opt, "refiner", None):
        say(f"kiln: loading the refiner {opt.refiner}")
        pipe.set_refiner(load(opt.refiner, device=opt.device, precision=opt.precision, prepack=PREPACK[opt.prepack],
                             offload=opt.offload),
                        opt.refiner_switch)
    pipe.lora_dir = opt.lora_dir
    pipe.embeddings_dir = opt.embeddings_dir
    for note in pipe.info.notes:
        say(f"kiln: {note}")
    spec, asked = parse(sampler, opt.schedule)
    own = model_default(spec, pipe.cfg.sampler_schedules) if asked is None else None
    if own:
        say(f"kiln: {spec.name} takes this model's default schedule, {own} (--schedule chooses another)")
    if opt.safety is not False and opt.safety_checker:
        pipe.load_safety_checker(opt.safety_checker)
    elif opt.safety:
        raise KilnError("--safety needs --safety-checker PATH (CompVis' checker weights: a diffusers "
                        "safety_checker folder or file)")
    elif opt.safety is None:
        say("kiln: the NSFW safety check is off (no --safety-checker weights given)")
    if opt.C not in (None, pipe.cfg.latent_channels):
        raise KilnError(f"--C {opt.C} does not match the model, whose latents have {pipe.cfg.latent_channels} channels")
    if opt.f not in (None, pipe.cfg.downscale):
        raise KilnError(f"--f {opt.f} does not match the model, whose autoencoder downsamples {pipe.cfg.downscale}x")
    if png_info and png_info.get("Model hash") and png_info["Model hash"] != pipe.model_hash:
        say(f"kiln: note: the image was made with model {png_info.get('Model', '?')} [{png_info['Model hash']}], "
            f"not {pipe.model_name} [{pipe.model_hash}]; the result will differ")
    watermark = None if opt.no_watermark else (opt.watermark or pipe.cfg.watermark)
    if watermark is not None and not watermark.strip():
        raise KilnError("--watermark must not be empty (use --no-watermark to switch it off)")
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

    def save_intermediate(i, total, images, seeds):
        for seed, im in zip(seeds, images):
            out.save_extra("intermediates", f"seed{seed}-step{i + 1:03d}.png", im)

    all_pixels = []
    n_batches = opt.n_iter * -(-len(prompts) // opt.n_samples)
    from tqdm.auto import tqdm
    bar = None  # made after the first batch, so that an early error is not printed onto a progress bar
    common = dict(negative_prompt=opt.negative_prompt, steps=opt.ddim_steps, sampler=sampler, schedule=opt.schedule,
                  cfg_scale=opt.scale, width=opt.W, height=opt.H, seed=opt.seed, batch_size=opt.n_samples,
                  n_iter=opt.n_iter, eta=opt.ddim_eta, s_noise=opt.s_noise, clip_skip=opt.clip_skip,
                  fixed_code=opt.fixed_code, progress=True, preview_every=opt.save_intermediates,
                  on_preview=save_intermediate if opt.save_intermediates else None, preview_full=True,
                  subseed=opt.subseed, subseed_strength=opt.subseed_strength,
                  seed_resize_from=parse_size(opt.seed_resize_from, "--seed-resize-from"), seamless=opt.seamless,
                  tile=opt.tile, loras=loras)
    if opt.command == "txt2img":
        results = pipe.txt2img_iter(prompts, **common, hires_scale=opt.hires_scale, hires_steps=opt.hires_steps,
                                    hires_upscaler=opt.hires_upscaler, hires_strength=opt.hires_strength)
    else:
        outpaint = parse_outpaint(opt.outpaint) if opt.command == "inpaint" else None
        if opt.command == "inpaint" and opt.mask is None and outpaint is None:
            raise KilnError("inpaint needs --mask (white = repaint) or --outpaint L,R,T,B")
        strength = opt.strength if opt.strength is not None else (1.0 if outpaint else 0.75)
        fill = getattr(opt, "inpaint_fill", None) or ("latent-noise" if outpaint else "original")
        results = pipe.img2img_iter(prompts, opt.init_img, strength=strength, resize_mode=opt.resize_mode,
                                    mask=getattr(opt, "mask", None), mask_blur=getattr(opt, "mask_blur", 4.0),
                                    inpaint_fill=fill, outpaint=outpaint,
                                    inpaint_area=getattr(opt, "inpaint_area", "whole"),
                                    masked_padding=getattr(opt, "masked_padding", 32), **common)
    for result in results:
        if bar is None:
            bar = tqdm(total=n_batches, desc="batches", unit="batch", disable=n_batches == 1)
        keep = getattr(opt, "keep_only", None)
        if keep is not None:
            result = result.only(keep)
        for seed, flagged in zip(result.seeds, result.flagged):
            if flagged:
                say(f"kiln: the image with seed {seed} was flagged by the safety checker and replaced by a black image")
        if not opt.skip_save:
            for pixels, text, seed, prompt in zip(result.pixels, result.infotexts, result.seeds, result.prompts):
                meta = pnginfo_for(opt.metadata_format, text, dict(result.params, prompt=prompt, seed=seed,
                                                                    model=pipe.model_name, model_hash=pipe.model_hash))
                out.save_sample(Image.fromarray(finish(pixels)), meta)
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
    p.add_argument("--caption-noise", type=float, default=None,
                   help="probability that a caption states an attribute wrongly, per attribute (default 0: "
                   "see docs/demo-model.md)")
    p.add_argument("--caption-noise-colors", type=float, default=None,
                   help="the same probability for the shape color and the background only (default: --caption-noise)")
    p.add_argument("--color-jitter", type=float, default=None,
                   help="spread of each named color in the training images, as a fraction (under 0.5) of its distance "
                   "to the nearest other palette color (default 0)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="fine-tune: start the UNet stage from this model written by `kiln train demo` "
                   "(fresh optimizer; steps count on from the model's own)")
    p.add_argument("--wise-ft", type=float, default=None, metavar="W",
                   help="with --init: write (1 - W) x the starting model + W x the fine-tune (a weight-space "
                   "ensemble, 0 < W <= 1; default 1: the fine-tune alone)")
    return p


def eval_parser(sub):
    p = sub.add_parser("eval", help="measure prompt adherence of the demo model",
                       description="Generate the held-out shapes prompts and judge them with the pixel analyzer.")
    p.add_argument("what", choices=["demo"])
    p.add_argument("--ckpt", default=None, help="model to evaluate (default: the embedded demo model)")
    p.add_argument("--samplers", default="ddim,plms", help="comma-separated sampler names, or 'all'")
    p.add_argument("--scales", default="1,5")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--deepcache", type=int, default=None, metavar="N", help="evaluate with DeepCache interval N")
    p.add_argument("--deepcache-depth", dest="deepcache_depth", type=int, default=3, metavar="D")
    return p


def run_train(opt):
    from dataclasses import replace

    from .demo.train import Trainer, TrainOptions

    o = TrainOptions(seed=opt.seed)
    for field, value in (("vae_steps", opt.vae_steps), ("unet_steps", opt.unet_steps), ("images", opt.images),
                         ("lr", opt.lr), ("offset_noise", opt.offset_noise), ("caption_noise", opt.caption_noise),
                         ("caption_noise_colors", opt.caption_noise_colors), ("color_jitter", opt.color_jitter)):
        if value is not None:
            flag = "--" + field.replace("_", "-")
            zero_ok = field in ("offset_noise", "caption_noise", "caption_noise_colors", "color_jitter")
            if value < (0 if zero_ok else 1e-12):
                raise KilnError(f"{flag} must be {'0 or more' if zero_ok else 'positive'}")
            if field.startswith("caption_noise") and value > 1:
                raise KilnError(f"{flag} is a probability: at most 1")
            if field == "color_jitter" and value >= 0.5:
                raise KilnError("--color-jitter must be under 0.5, or jittered colors could cross to another name")
            o = replace(o, **{field: value})
    if opt.init:
        o = replace(o, init=opt.init)
    if opt.wise_ft is not None:
        if not 0 < opt.wise_ft <= 1:
            raise KilnError("--wise-ft must be above 0 and at most 1")
        o = replace(o, wise_ft=opt.wise_ft)
    try:
        trainer = Trainer(opt.workdir, o, log=lambda m: say(f"kiln: {m}"))
    except CheckpointError as e:  # only --init reads a model here: missing, unreadable, or not a kiln demo model
        raise KilnError(f"--init: {e}") from None
    trainer.run(Path(opt.out))


def run_eval(opt):
    from .demo.report import EMBEDDED, table
    from .pipeline import load

    pipe = load(opt.ckpt or EMBEDDED, device=opt.device, precision="full")
    if opt.deepcache:
        pipe.set_deepcache(opt.deepcache, opt.deepcache_depth)
    try:
        scales = [float(s) for s in opt.scales.split(",")]
    except ValueError:
        raise KilnError(f"--scales must be comma-separated numbers, not {opt.scales!r}") from None
    from .samplers import SAMPLERS

    samplers = list(SAMPLERS) if opt.samplers == "all" else [x.strip() for x in opt.samplers.split(",") if x.strip()]
    text, _ = table(pipe, samplers=samplers, scales=scales, steps=opt.steps, seed=opt.seed)
    print(text)


def info_parser(sub):
    p = sub.add_parser("info", help="show an image's generation parameters, or the samplers",
                       description="Print the generation parameters stored in a PNG (kiln's or A1111's), decode its "
                                   "invisible watermark, or list the samplers and schedules.")
    p.add_argument("image", nargs="?", help="a PNG written by kiln or A1111")
    p.add_argument("--json", action="store_true", help="print the parameters as JSON")
    p.add_argument("--watermark", action="store_true", help="decode the image's invisible watermark")
    p.add_argument("--watermark-text", dest="watermark_text", default="StableDiffusionV1",
                   help="the watermark text expected (its length is what the decoder needs)")
    p.add_argument("--samplers", action="store_true", help="list the samplers and schedules")
    return p


def run_info(opt):
    if opt.samplers or not opt.image:
        return print_samplers()
    import json

    from .postprocess.pnginfo import read_text
    from .postprocess.infotext import parse_infotext

    if opt.watermark:
        import numpy as np
        from PIL import Image

        from .postprocess.watermark import MIN_WATERMARK_SIZE, decode_watermark

        try:
            with Image.open(opt.image) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise KilnError(f"{opt.image}: not a readable image ({e})") from None
        if min(pixels.shape[:2]) < MIN_WATERMARK_SIZE:
            raise KilnError(f"{opt.image}: images smaller than {MIN_WATERMARK_SIZE}x{MIN_WATERMARK_SIZE} carry no watermark")
        found = decode_watermark(pixels, len(opt.watermark_text.encode("utf-8")))
        print(f"watermark: {found!r}" + (" (matches)" if found == opt.watermark_text else
                                          f" (does not match {opt.watermark_text!r})"))
        return None
    text = read_text(opt.image)
    print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if opt.json else text)
    return None


def print_samplers():
    from .samplers import SAMPLER_LIST, SCHEDULES
    from .samplers.schedules import SCHEDULE_LABELS

    rows = [("name", "A1111 name", "default schedule", "eta", "UNet calls/step")]
    for s in SAMPLER_LIST:
        rows.append((s.name, s.label, s.schedule if s.kind == "denoise" else "normal (CompVis uniform)",
                     "-" if s.eta is None else f"{s.eta:g}", str(s.evals_per_step)))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows))
    print("\nschedules: " + ", ".join(f"{k} ({SCHEDULE_LABELS[k]})" for k in SCHEDULES)
          + "; automatic = the sampler's default.\nDDIM and PLMS step on CompVis' timesteps: normal (uniform) or quad")
    from .checkpoints.detect import detect
    from .checkpoints.sources import open_file
    from .demo.report import EMBEDDED

    own = detect(open_file(EMBEDDED)).sampler_schedules  # the header only, as the loader reads it
    print("a model may set its own defaults; the embedded demo model's: "
          + (", ".join(f"{k} {v}" for k, v in own.items()) or "none"))


def serve_parser(sub):
    p = sub.add_parser("serve", help="HTTP API (A1111-compatible /sdapi/v1 and /api/v1 jobs) and web UI",
                       description="Serve the model over HTTP: AUTOMATIC1111's /sdapi/v1 API, kiln's job API "
                                   "(/api/v1, with server-sent progress events) and a web UI at /. One model "
                                   "worker behind a bounded FIFO queue; the model loads once and stays warm.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--ckpt", default=None, help="the model to load first (default: the embedded demo model)")
    p.add_argument("--ckpt-dir", dest="ckpt_dir", default=None,
                   help="a folder of checkpoints clients may switch to (by name, via /sdapi/v1/options)")
    p.add_argument("--outdir", default="outputs/serve", help="where generated images are saved")
    p.add_argument("--no-save", dest="no_save", action="store_true",
                   help="do not save the web UI's and job API's results (A1111 clients' save_images still saves)")
    p.add_argument("--api-auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP Basic credentials required on every endpoint but the UI's static files")
    p.add_argument("--token", default=None, help="a bearer token accepted on every endpoint (also: KILN_TOKEN)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["full", "autocast", "fp16", "bf16"], default="full")
    add_memory_flags(p)
    p.add_argument("--safety-checker", dest="safety_checker", default=None, metavar="PATH",
                   help="check every image with CompVis' NSFW checker (weights folder or file)")
    p.add_argument("--lora-dir", dest="lora_dir", default=None,
                   help="folder where <lora:name:weight> tags in prompts are looked up (listed at /sdapi/v1/loras)")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual-inversion embeddings, used in prompts by file name (listed at /sdapi/v1/embeddings)")
    p.add_argument("--queue-size", dest="queue_size", type=int, default=16,
                   help="jobs waiting beyond this are refused with 503 and Retry-After")
    p.add_argument("--max-size", dest="max_size", type=int, default=2048, help="largest width/height allowed")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=8)
    p.add_argument("--preview-every", dest="preview_every", type=int, default=1,
                   help="live preview every N sampler steps (0: none)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="deploy on Ray Serve (a local cluster, or the one at ADDRESS); see --replicas")
    p.add_argument("--replicas", type=int, default=1, help="model replicas on Ray Serve (each loads the model once)")
    p.add_argument("--min-replicas", dest="min_replicas", type=int, default=None,
                   help="autoscale between --min-replicas and --max-replicas instead of a fixed count")
    p.add_argument("--max-replicas", dest="max_replicas", type=int, default=None)
    p.add_argument("--max-ongoing-requests", dest="max_ongoing_requests", type=int, default=1,
                   help="jobs one model replica holds at once (it renders one at a time; the ingress queues "
                        "the rest and dispatches to free replicas)")
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def run_serve(opt):
    import logging
    import os

    from .server import Limits, ServerConfig, create_app, parse_api_auth

    try:
        import uvicorn
    except ImportError:
        raise KilnError("kiln serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    try:
        auth = parse_api_auth(opt.api_auth)
    except ValueError as e:
        raise KilnError(str(e)) from None
    token = opt.token or os.environ.get("KILN_TOKEN") or None
    for name in ("queue_size", "max_size", "max_batch_size"):
        if getattr(opt, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
    if opt.preview_every < 0:
        raise KilnError("--preview-every must be 0 or more")
    if opt.ckpt and not Path(opt.ckpt).exists():
        raise KilnError(f"--ckpt {opt.ckpt}: no such file or folder")
    if opt.ckpt_dir and not Path(opt.ckpt_dir).is_dir():
        raise KilnError(f"--ckpt-dir {opt.ckpt_dir}: not a folder")
    if opt.lora_dir and not Path(opt.lora_dir).is_dir():
        raise KilnError(f"--lora-dir {opt.lora_dir}: not a folder")
    if opt.embeddings_dir and not Path(opt.embeddings_dir).is_dir():
        raise KilnError(f"--embeddings-dir {opt.embeddings_dir}: not a folder")
    if opt.host not in ("127.0.0.1", "localhost", "::1") and not (auth or token):
        say(f"kiln: warning: listening on {opt.host} without --api-auth or --token: anyone who can reach this "
            "machine can use the API")
    logging.basicConfig(level=opt.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = ServerConfig(ckpt=opt.ckpt, ckpt_dir=opt.ckpt_dir, outdir=opt.outdir, save=not opt.no_save,
                          device=opt.device, precision=opt.precision, offload=opt.offload, prepack=PREPACK[opt.prepack],
                          limits=Limits(max_size=opt.max_size, max_batch_size=opt.max_batch_size,
                                        queue_size=opt.queue_size),
                          api_auth=auth, token=token, preview_every=opt.preview_every,
                          safety_checker=opt.safety_checker, lora_dir=opt.lora_dir,
                          embeddings_dir=opt.embeddings_dir)
    if opt.ray is not None:
        from .distributed.serve import run

        for name in ("replicas", "max_ongoing_requests"):
            if getattr(opt, name) < 1:
                raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
        say(f"kiln: deploying on Ray Serve at http://{opt.host}:{opt.port}/")
        run(config, host=opt.host, port=opt.port, address=opt.ray or None, num_replicas=opt.replicas,
            min_replicas=opt.min_replicas, max_replicas=opt.max_replicas,
            max_ongoing_requests=opt.max_ongoing_requests)
        return
    say("kiln: loading the model ...")
    app = create_app(config)
    say(f"kiln: serving {app.state.worker.model_title} on http://{opt.host}:{opt.port}/ "
        f"(A1111 API under /sdapi/v1, docs at /docs)")
    try:
        uvicorn.run(app, host=opt.host, port=opt.port, log_level=opt.log_level)
    finally:
        app.state.worker.stop()  # cancel queued jobs, stop the running one at its next step


def batch_parser(sub):
    p = sub.add_parser("batch", help="generate one image per row of a prompts file (in-process or on Ray)",
                       description="Generate one image per row of a prompts file: text (one prompt per line), "
                                   "JSONL or CSV with per-row prompt, negative_prompt, seed, steps, sampler, "
                                   "schedule, cfg_scale, width, height. Writes OUTDIR/images/NNNNNN.png (with "
                                   "infotext) and OUTDIR/manifest.jsonl; re-running skips finished rows.")
    p.add_argument("prompts", help="the prompts file (.txt, .jsonl or .csv)")
    p.add_argument("--outdir", default="outputs/batch", help="a folder, or a pyarrow filesystem URI (s3://…)")
    p.add_argument("--ckpt", default=None, help="the model (default: the embedded demo model)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data (a local cluster, or the cluster at ADDRESS, e.g. ray://head:10001 or auto)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the model once (one GPU each "
                                                          "when the cluster has GPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per renderer; outputs are byte-identical across runs with the same value "
                        "(default: all cores in-process; on Ray cores/workers, leaving Ray one core when a "
                        "worker would take them all)")
    p.add_argument("--seed", type=int, default=42, help="base seed: a row without a seed gets seed + its row index")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--schedule", default=None)
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--W", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--negative-prompt", dest="negative_prompt", default="")
    p.add_argument("--retry-errors", dest="retry_errors", action="store_true",
                   help="run rows again whose earlier attempt failed")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["full", "autocast", "fp16", "bf16"], default="full")
    return p


def run_batch_command(opt):
    from .distributed.batch import Defaults, run_batch
    from .demo.report import EMBEDDED

    if opt.workers < 1:
        raise KilnError("--workers must be at least 1")
    if opt.threads is not None and opt.threads < 1:
        raise KilnError("--threads must be at least 1")
    ckpt = opt.ckpt or str(EMBEDDED)
    if "://" not in ckpt and not Path(ckpt).exists():
        raise KilnError(f"--ckpt {ckpt}: no such file or folder")
    defaults = Defaults(seed=opt.seed, steps=opt.steps, sampler=opt.sampler, schedule=opt.schedule,
                        cfg_scale=opt.scale, width=opt.W, height=opt.H, negative_prompt=opt.negative_prompt)
    s = run_batch(opt.prompts, opt.outdir, ckpt=ckpt, defaults=defaults, use_ray=opt.ray is not None,
                  ray_address=opt.ray or None, workers=opt.workers, device=opt.device, precision=opt.precision,
                  retry_errors=opt.retry_errors, threads_per_worker=opt.threads)
    say(f"kiln: {s.rows} rows: {s.ok} written, {s.errors} failed (see manifest.jsonl), {s.skipped} already done "
        f"before this run; {s.seconds:.1f} s")
    return 1 if s.errors else 0


PREPACK = {"auto": "auto", "on": True, "off": False}


def add_memory_flags(p):
    p.add_argument("--prepack", choices=["auto", "on", "off"], default="auto",
                   help="CPU: pre-pack convolution weights for oneDNN (UNet 1.3-1.7x faster at 256x256, about even at "
                        "512x512). auto: where memory stays flat (weights mapped from an fp32 file); on: also for "
                        "weights converted at load (+ the conv weights' size); docs/performance.md")
    p.add_argument("--no-prepack", dest="prepack", action="store_const", const="off", help="the same as --prepack off")
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--medvram", dest="offload", action="store_const", const="medvram", default=None,
                      help="GPU: keep the weights in CPU memory; text encoder, UNet and VAE visit the GPU one at a time")
    vram.add_argument("--lowvram", dest="offload", action="store_const", const="lowvram",
                      help="GPU: as --medvram, and the UNet too goes block by block (least memory, slowest)")


def bench_parser(sub):
    p = sub.add_parser("bench", help="kiln against diffusers on the same weights (speed, memory, load time)",
                       description="Runs kiln and diffusers (a test-only dependency) in fresh processes on the same "
                                   "weights (random full-size SD 1.5, built once and cached, or --weights) and prints "
                                   "kiln/diffusers ratios: UNet step, VAE decode, txt2img, load time, peak memory, "
                                   "and the largest difference between the two images.")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256; 512 on a GPU)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the txt2img run (default 4)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--repeat", type=int, default=3, help="timed UNet calls (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both runs (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also run kiln with torch.compile (--compile)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true",
                   help="also run kiln with channels-last weights (--channels-last)")
    p.add_argument("--no-prepack", dest="no_prepack", action="store_true",
                   help="also run kiln without oneDNN weight pre-packing (--no-prepack: PyTorch's plain eager path)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="also run kiln with DeepCache interval N (compare the txt2img time; the image differs)")
    p.add_argument("--medvram", action="store_true", help="GPU: also run kiln with --medvram (peak device memory)")
    p.add_argument("--lowvram", action="store_true", help="GPU: also run kiln with --lowvram (peak device memory)")
    p.add_argument("--weights", default=None, help="a CompVis SD 1.x file instead of the random weights")
    p.add_argument("--json", default=None, help="write the report here as JSON")


def run_bench(opt):
    from .bench import bench

    if opt.repeat < 1 or opt.steps < 1:
        raise KilnError("--repeat and --steps must be at least 1")
    bench(opt)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="kiln", description="Stable Diffusion in plain, fast, verifiable PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    txt2img_parser(sub)
    txt2img_parser(sub, "img2img")
    txt2img_parser(sub, "inpaint")
    train_parser(sub)
    eval_parser(sub)
    info_parser(sub)
    serve_parser(sub)
    batch_parser(sub)
    bench_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    opt = parser.parse_args(argv)
    try:
        rc = {"txt2img": run_txt2img, "img2img": run_txt2img, "inpaint": run_txt2img, "train": run_train,
              "eval": run_eval, "info": run_info, "serve": run_serve, "batch": run_batch_command,
              "bench": run_bench}[opt.command](opt)
    except KilnError as e:
        say(f"kiln: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("kiln: interrupted")
        return 130
    except MemoryError:
        say("kiln: error: out of memory; try fewer --n_samples or a smaller --H/--W")
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
