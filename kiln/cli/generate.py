"""`kiln txt2img`, `kiln img2img`, `kiln inpaint`: CompVis' script flags, same spellings and defaults, plus the
modern options. The flags are turned into one `GenerationParams` (`params_from_cli`); `--from-png` reads one
back from an image's infotext."""
from __future__ import annotations

from pathlib import Path

from ..errors import KilnError
from .control import add_control_flags, control_units, units_from_png
from .common import PREPACK, add_memory_flags, add_precision_flag, say
from .scripts import Default, add_script_flags, counts, run_script, script_request

COMPVIS_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
COMPVIS_CONFIG = "configs/stable-diffusion/v1-inference.yaml"

MODES = {
    # command: (help, description, outdir, n_iter, n_samples, scale)
    "txt2img": ("generate images from a text prompt", "Generate images from text (flags as CompVis' "
                "scripts/txt2img.py).", "outputs/txt2img-samples", 2, 3, 7.5),
    "img2img": ("re-render an image with a prompt", "Re-render an init image guided by a prompt (flags as CompVis' "
                "scripts/img2img.py).", "outputs/img2img-samples", 1, 2, 5.0),
    "inpaint": ("repaint the masked part of an image, or extend it (outpainting)", "Repaint where the mask is white "
                "(or the new borders of --outpaint), keeping the rest.", "outputs/inpainting-samples", 1, 2, 5.0),
}
# GenerationParams field → the flag's dest, where the CompVis spelling differs (every other field: its own name)
FLAG = {"steps": "ddim_steps", "cfg_scale": "scale", "width": "W", "height": "H", "batch_size": "n_samples",
        "eta": "ddim_eta", "init_image": "init_img"}
# --from-png: what the image's parameters decide (a field the image does not record takes its default)
FROM_IMAGE = ("prompt", "negative_prompt", "seed", "clip_skip", "eta", "s_noise", "subseed", "subseed_strength",
              "seed_resize_from", "seamless")


def txt2img_parser(sub, command="txt2img"):
    help_, description, outdir, n_iter, n_samples, scale = MODES[command]
    p = sub.add_parser(command, help=help_, description=description)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    if command != "txt2img":
        _init_flags(p, command)
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", type=str, default="",
                   help="replaces the empty unconditional prompt of classifier-free guidance")
    p.add_argument("--styles-file", dest="styles_file", default=None, metavar="PATH",
                   help="A1111's styles.csv (name, prompt, negative_prompt), for --style")
    p.add_argument("--style", dest="styles", action="append", default=[], metavar="NAME",
                   help="apply this style of --styles-file to the prompt and negative prompt (repeatable: in order)")
    p.add_argument("--outdir", type=str, nargs="?", default=outdir)
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    _sampling_flags(p)
    _variation_flags(p)
    if command == "txt2img":
        _hires_flags(p)
    p.add_argument("--n_iter", type=int, default=Default(n_iter), help="sample this often")
    size_default = "the model's native size, 512 for SD v1" if command == "txt2img" else \
        "the init image's, rounded down to a multiple of 8"
    p.add_argument("--H", type=int, default=None, help=f"image height in pixels (default: {size_default})")
    p.add_argument("--W", type=int, default=None, help=f"image width in pixels (default: {size_default})")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's, 4 for SD v1)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD v1)")
    p.add_argument("--n_samples", type=int, default=Default(n_samples),
                   help="how many samples per prompt (batch size; 1 with a script unless given)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=scale, help="classifier-free guidance scale")
    p.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--seed", type=int, default=42, help="image i of the run uses seed + i")
    _model_flags(p)
    add_control_flags(p)
    _output_flags(p)
    add_script_flags(p, command)
    return p


def _init_flags(p, command):
    p.add_argument("--init-img", "--init_img", dest="init_img", type=str, required=True,
                   help="the image to start from (any format PIL reads; EXIF rotation applied)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the image is re-done: 0 keeps it, 1 ignores it (default 0.75; with "
                        "--outpaint 1.0)")
    p.add_argument("--resize-mode", dest="resize_mode", default="just-resize",
                   choices=["just-resize", "crop-and-resize", "resize-and-fill"],
                   help="how the image is fitted to --W/--H (A1111's resize modes)")
    if command != "inpaint":
        return
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


def _sampling_flags(p):
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    p.add_argument("--sampler", type=str, default=None,
                   help="sampler, our name or A1111's (e.g. dpmpp_2m or \"DPM++ 2M Karras\"); default ddim. "
                        "See `kiln info --samplers`")
    p.add_argument("--schedule", type=str, default=None,
                   help="noise schedule: normal, karras, exponential, sgm_uniform, simple, align_your_steps, lcm "
                        "for the k-diffusion samplers; normal (CompVis' uniform) or quad for ddim and plms; "
                        "diffusers' timestep spacings leading, trailing (Turbo, Lightning, Hyper-SD), linspace for "
                        "both (default: the sampler's own)")
    p.add_argument("--fixed_code", action="store_true",
                   help="reuse the first iteration's start codes for every iteration")
    p.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None,
                   help="noise of stochastic samplers (DDIM: 0 = deterministic, the default; ancestral/SDE: 1)")
    p.add_argument("--s-noise", dest="s_noise", type=float, default=1.0, help="scale of the injected noise (s_noise)")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=1,
                   help="use the text encoder's hidden state this many layers from the end (1 = last, as A1111)")
    p.add_argument("--save-intermediates", dest="save_intermediates", type=int, nargs="?", const=5, default=0,
                   metavar="EVERY", help="also write the decoded pred_x0 every EVERY steps (default 5) "
                                         "to OUTDIR/intermediates/")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (kohya/A1111, LoCon or diffusers/PEFT file) at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", dest="lora_dir", default=None,
                   help="folder where <lora:name:weight> tags in the prompt are looked up")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual-inversion embeddings (.pt, .bin, .safetensors), used in prompts by file name")
    p.add_argument("--upscaler-dir", dest="upscaler_dir", default=None, metavar="DIR",
                   help="model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT files) for --hires-upscaler and "
                   "--upscaler by file name, besides models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT")
    p.add_argument("--seamless", action="store_true", help="tileable output (circular padding in every convolution)")
    p.add_argument("--tile", choices=["auto", "on", "off"], default="auto",
                   help="UNet and VAE decoder in overlapping tiles (auto: above twice the model's native size)")


def _variation_flags(p):
    p.add_argument("--subseed", type=int, default=None, help="variation seed (image i uses subseed + i)")
    p.add_argument("--subseed-strength", dest="subseed_strength", type=float, default=0.0,
                   help="how far towards the variation seed's noise (0 … 1, slerp)")
    p.add_argument("--seed-resize-from", dest="seed_resize_from", type=str, default=None, metavar="WxH",
                   help="keep the composition a seed has at WxH (A1111's 'resize seed from')")


def _hires_flags(p):
    p.add_argument("--hires-scale", dest="hires_scale", type=float, default=None,
                   help="hires fix: generate, upscale by this factor, then re-render at the larger size")
    p.add_argument("--hires-upscaler", dest="hires_upscaler", default="latent", metavar="NAME",
                   help="latent (default), lanczos, nearest, or a model upscaler: its name in --upscaler-dir or "
                   "models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT (A1111's names), or its file")
    p.add_argument("--hires-steps", dest="hires_steps", type=int, default=None,
                   help="steps of the second pass (default: --ddim_steps)")
    p.add_argument("--hires-strength", dest="hires_strength", type=float, default=0.7,
                   help="denoising strength of the second pass")


def _model_flags(p):
    p.add_argument("--refiner", type=str, default=None,
                   help="a second checkpoint (the SDXL refiner) that runs the last steps")
    p.add_argument("--refiner-switch", dest="refiner_switch", type=float, default=0.8,
                   help="fraction of the steps the main model runs before the refiner takes over")
    p.add_argument("--config", type=str, default=None, help=f"CompVis model yaml (default: detected from the "
                                                            f"weights; {COMPVIS_CONFIG} is used when present)")
    p.add_argument("--ckpt", type=str, default=None,
                   help=f"weights: CompVis .ckpt/.safetensors or a diffusers folder (default: {COMPVIS_CKPT})")
    add_precision_flag(p)
    p.add_argument("--ema", choices=["auto", "on", "off"], default="auto",
                   help="use the file's EMA weights (auto: when present)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="what the UNet predicts: eps (noise) or v (SD 2.x 768 models); default: from the yaml "
                        "beside the weights, else detected (SD 2.x: A1111's test on the weights)")
    p.add_argument("--vae", type=str, default=None, help="a separate VAE file (CompVis layout, e.g. the ft-MSE VAE)")
    p.add_argument("--decoder", type=str, default=None, metavar="FILE",
                   help="decode the final images with this TAESD/TAESDXL decoder (.pth, .safetensors or a diffusers "
                        "AutoencoderTiny folder; TAESD: the model's file in models/VAE-approx) instead of the VAE")
    p.add_argument("--preview-decoder", dest="preview_decoder", type=str, default=None, metavar="FILE",
                   help="TAESD decoder for --save-intermediates (default: models/VAE-approx/taesd_decoder.* or "
                        "taesdxl_decoder.* when present; else the VAE)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE decoder (slow first image; for GPUs: on CPUs the eager "
                        "pre-packed path measured faster; docs/performance.md)")
    p.add_argument("--backend", choices=["torch", "openvino"], default="torch",
                   help="openvino: run the UNet, VAE and text encoder through OpenVINO on the CPU (pip install "
                        "'kiln[openvino]'; the first image at a size compiles; cached in ~/.cache/kiln/openvino)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="NHWC convolution weights (the default on CUDA; on CPUs ~10%% faster UNet, +2.7 GB memory)")
    add_memory_flags(p)
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="reuse the UNet's deep features: the whole UNet every N-th call, only its outer blocks "
                        "between (faster, a different image; off by default; docs/performance.md)")
    p.add_argument("--deepcache-depth", dest="deepcache_depth", type=int, default=3, metavar="D",
                   help="how many outer input/output blocks run at the cached steps (default 3)")


def _output_flags(p):
    p.add_argument("--no-watermark", dest="no_watermark", action="store_true",
                   help="do not add the invisible watermark")
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


# ---------------------------------------------------------------------------------------------- flags → params
def _set_flag(opt, name, value):
    if name == "seed_resize_from" and value is not None:
        value = f"{value[0]}x{value[1]}"
    setattr(opt, FLAG.get(name, name), value)


def apply_png_parameters(opt):
    """--from-png: every generation parameter from the image; one image (its own batch made again), no grid."""
    from ..pipeline import GenerationParams
    from ..pipeline.infotext import params_from_infotext
    from ..output.pnginfo import read_parameters

    info = read_parameters(opt.from_png)
    try:
        fields = params_from_infotext(info)
    except ValueError as e:
        raise KilnError(f"--from-png {opt.from_png}: {e}") from None
    defaults = GenerationParams()
    for name in FROM_IMAGE:
        _set_flag(opt, name, fields.get(name, getattr(defaults, name)))
    for name in ("steps", "sampler", "schedule", "cfg_scale", "seed", "width", "height"):
        if name in fields:
            _set_flag(opt, name, fields[name])
    opt.plms = False
    if "decoder" in fields and opt.decoder is None:  # "VAE Decoder: TAESD": the model's, from models/VAE-approx
        opt.decoder = fields["decoder"]
    if "Refiner" in info and opt.command == "txt2img":
        try:
            opt.refiner_switch = float(info.get("Refiner switch at", opt.refiner_switch))
        except ValueError:
            raise KilnError(f"--from-png {opt.from_png}: bad Refiner switch at {info['Refiner switch at']!r}") from None
        if not opt.refiner:
            say(f"kiln: note: the image was refined by {info['Refiner']}; pass --refiner FILE to reproduce it")
    keys = ("hires_scale", "hires_steps", "hires_upscaler", "hires_strength")
    if "hires_scale" in fields and opt.command == "txt2img":
        for name in keys:
            _set_flag(opt, name, fields[name])
    units_from_png(opt, info, say)
    if opt.command != "txt2img" and "strength" in fields:
        opt.strength = fields["strength"]
    # The image's whole batch is made again (same size, same prompt, consecutive seeds) and only its own
    # position kept: batch size changes the last bit of some pixels, so this is what reproduces it exactly.
    opt.n_samples, opt.n_iter, opt.skip_grid, opt.from_file = fields.get("batch_size", 1), 1, True, None
    opt.keep_only = fields.get("batch_pos", 0)
    if not 0 <= opt.keep_only < opt.n_samples:
        raise KilnError(f"--from-png {opt.from_png}: Batch pos {opt.keep_only} is outside Batch size {opt.n_samples}")
    opt.seed -= opt.keep_only
    return info


def params_from_cli(opt, prompts: list[str], loras: list):
    """The flags as one `GenerationParams`: each field from its flag (`FLAG` names the CompVis spellings), and
    the few that need reading (sizes, the outpainting borders, the mode's defaults)."""
    from ..pipeline import GenerationParams

    kw = {f: getattr(opt, FLAG.get(f, f)) for f in GenerationParams.names() if hasattr(opt, FLAG.get(f, f))}
    kw["watermark"] = False if opt.no_watermark else (opt.watermark if opt.watermark is not None else True)
    prompts, kw["negative_prompt"] = apply_styles(opt, prompts, kw["negative_prompt"])
    kw.update(prompt=prompts, sampler=opt.sampler or ("plms" if opt.plms else "ddim"), loras=loras,
              seed_resize_from=parse_size(opt.seed_resize_from, "--seed-resize-from"), controlnets=control_units(opt))
    if opt.command == "inpaint":
        kw["outpaint"] = outpaint = parse_outpaint(opt.outpaint)
        if opt.mask is None and outpaint is None:
            raise KilnError("inpaint needs --mask (white = repaint) or --outpaint L,R,T,B")
        kw["inpaint_fill"] = opt.inpaint_fill or ("latent-noise" if outpaint else "original")
    if opt.command != "txt2img":
        kw["strength"] = opt.strength if opt.strength is not None else (1.0 if kw.get("outpaint") else 0.75)
    return GenerationParams.make(**kw)


def apply_styles(opt, prompts: list[str], negative: str) -> tuple[list[str], str]:
    """The prompts and the negative prompt with the --style styles of --styles-file applied (as the server
    applies a request's styles: kiln.styles)."""
    from ..styles import read_styles

    if opt.styles and not opt.styles_file:
        raise KilnError("--style needs --styles-file (A1111's styles.csv)")
    try:
        table = read_styles(opt.styles_file)
        styled = [table.apply(opt.styles, p, "")[0] for p in prompts]
        return styled, table.apply(opt.styles, "", negative)[1]
    except KilnError as e:
        raise KilnError(f"--style: {e}" if "unknown style" in str(e) else str(e)) from None


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
    from ..demo.report import EMBEDDED

    if opt.ckpt:
        return opt.ckpt
    if Path(COMPVIS_CKPT).exists():
        return COMPVIS_CKPT
    if EMBEDDED.exists():
        say("kiln: no --ckpt given: using the embedded demo model (64x64 shapes; pass --ckpt for a real checkpoint)")
        return str(EMBEDDED)
    raise KilnError(f"no --ckpt given, {COMPVIS_CKPT} does not exist and the embedded model is missing; "
                    "pass --ckpt FILE (a CompVis .ckpt/.safetensors file or a diffusers folder)")


# ---------------------------------------------------------------------------------------------- running
def check_flags(opt):
    """What can be refused before a model is loaded."""
    from ..samplers import parse

    if opt.n_samples < 1 or opt.n_iter < 1:
        raise KilnError(f"--n_samples and --n_iter must be at least 1 (got {opt.n_samples} and {opt.n_iter})")
    for name in ("H", "W"):
        v = getattr(opt, name)
        if v is not None and (v < 8 or v % 8):
            raise KilnError(f"--{name} must be a positive multiple of 8, got {v}")
    if opt.plms and opt.sampler and opt.sampler.lower() != "plms":
        raise KilnError(f"--plms contradicts --sampler {opt.sampler}")
    try:
        parse(opt.sampler or ("plms" if opt.plms else "ddim"), opt.schedule)
    except ValueError as e:
        raise KilnError(str(e)) from None
    if opt.watermark is not None and not opt.no_watermark and not opt.watermark.strip():
        raise KilnError("--watermark must not be empty (use --no-watermark to switch it off)")
    if opt.save_intermediates < 0:
        raise KilnError(f"--save-intermediates must be a positive number of steps, got {opt.save_intermediates}")
    apply_styles(opt, [], "")  # a bad styles file or an unknown style is refused before the model loads
    for path, _ in (loras := [parse_lora(spec) for spec in opt.lora]):
        if not Path(path).is_file():
            raise KilnError(f"--lora {path}: no such file")
    for flag, folder in (("--lora-dir", opt.lora_dir), ("--embeddings-dir", opt.embeddings_dir),
                         ("--upscaler-dir", opt.upscaler_dir)):
        if folder and not Path(folder).is_dir():
            raise KilnError(f"{flag} {folder}: not a folder")
    for flag, spec in (("--decoder", opt.decoder), ("--preview-decoder", opt.preview_decoder)):
        if spec and spec.upper() != "TAESD" and not Path(spec).exists():
            raise KilnError(f"{flag} {spec}: no such file or folder")
    if getattr(opt, "refiner", None) and not Path(opt.refiner).exists():
        raise KilnError(f"--refiner {opt.refiner}: no such file or folder")
    if opt.backend == "openvino":
        from ..pipeline.openvino_backend import check_openvino

        if opt.compile:
            raise KilnError("--compile and --backend openvino do not go together (openvino compiles already)")
        check_openvino(opt.device, opt.offload)
    return loras


def load_for(opt):
    """The model the flags ask for, set up as they say."""
    from ..pipeline import load

    config = opt.config or (COMPVIS_CONFIG if not opt.ckpt and Path(COMPVIS_CONFIG).exists() else None)
    pipe = load(resolve_ckpt(opt), device=opt.device, precision=opt.precision, ema=opt.ema, vae=opt.vae,
                config=config, prediction=opt.prediction, channels_last=opt.channels_last,
                prepack=PREPACK[opt.prepack], offload=opt.offload, backend=opt.backend)
    if opt.compile:
        say("kiln: compiling the UNet and VAE decoder (the first image takes longer)")
        pipe.compile()
    if opt.deepcache:
        pipe.set_deepcache(opt.deepcache, opt.deepcache_depth)
    if getattr(opt, "refiner", None):
        say(f"kiln: loading the refiner {opt.refiner}")
        pipe.set_refiner(load(opt.refiner, device=opt.device, precision=opt.precision,
                              prepack=PREPACK[opt.prepack], offload=opt.offload, backend=opt.backend),
                       opt.refiner_switch)
    pipe.lora_dir, pipe.embeddings_dir = opt.lora_dir, opt.embeddings_dir
    from ..pipeline.upscalers import Upscalers

    pipe.upscalers = Upscalers(opt.upscaler_dir, device=opt.device, precision=opt.precision, progress=True)
    set_decoders(pipe, opt)
    for note in pipe.info.notes:
        say(f"kiln: {note}")
    if opt.safety is not False and opt.safety_checker:
        pipe.load_safety_checker(opt.safety_checker)
    elif opt.safety:
        raise KilnError("--safety needs --safety-checker PATH (CompVis' checker weights: a diffusers "
                        "safety_checker folder or file)")
    elif opt.safety is None:
        say("kiln: the NSFW safety check is off (no --safety-checker weights given)")
    if opt.C not in (None, pipe.cfg.latent_channels):
        raise KilnError(f"--C {opt.C} does not match the model, whose latents have {pipe.cfg.latent_channels} "
                        "channels")
    if opt.f not in (None, pipe.cfg.downscale):
        raise KilnError(f"--f {opt.f} does not match the model, whose autoencoder downsamples "
                        f"{pipe.cfg.downscale}x")
    return pipe


def set_decoders(pipe, opt):
    """A1111's models/VAE-approx (where --decoder TAESD looks) and the preview decoder: --preview-decoder, else
    the model's file there when it exists (used only when previews are made: --save-intermediates)."""
    from ..pipeline.decoders import APPROX_DIR, TAESD, find_approx

    pipe.vae_approx_dir = APPROX_DIR
    if opt.preview_decoder:
        pipe.set_preview_decoder(opt.preview_decoder)
    elif opt.save_intermediates and find_approx(APPROX_DIR, pipe.cfg):
        pipe.set_preview_decoder(TAESD)


def run_txt2img(opt):
    from ..output import OutputDir
    from ..samplers import model_default, parse

    png_info = apply_png_parameters(opt) if opt.from_png else None
    request = script_request(opt)
    if request is not None:
        counts(opt)
    loras = check_flags(opt)
    prompts = read_prompts(opt) if request is None else [opt.prompt] * opt.n_samples
    out = OutputDir(opt.outdir)
    pipe = load_for(opt)
    params = params_from_cli(opt, prompts, loras)
    spec, asked = parse(params.sampler, params.schedule)
    own = model_default(spec, pipe.cfg.sampler_schedules) if asked is None else None
    if own:
        say(f"kiln: {spec.name} takes this model's default schedule, {own} (--schedule chooses another)")
    if png_info and png_info.get("Model hash") and png_info["Model hash"] != pipe.model_hash:
        say(f"kiln: note: the image was made with model {png_info.get('Model', '?')} [{png_info['Model hash']}], "
            f"not {pipe.model_name} [{pipe.model_hash}]; the result will differ")
    if request is not None:
        run_script(opt, pipe, params, out, request)
    else:
        render(opt, pipe, params, out)
    say(f"Your samples are ready and waiting for you here:\n{out.root}\n\nEnjoy.")


def render(opt, pipe, params, out):
    """Generate batch by batch, saving each sample as it comes (finished by the generation loop: safety check,
    watermark, infotext), then the grid (watermarked as a whole, as CompVis' scripts do)."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from ..output import make_grid, pnginfo_for
    from ..pipeline.watermark import can_watermark, put_watermark
    from ..pipeline import Hooks

    watermark = params.watermark_text(pipe.cfg)

    def save_intermediate(i, total, images, seeds):
        for seed, im in zip(seeds, images):
            out.save_extra("intermediates", f"seed{seed}-step{i + 1:03d}.png", im)

    hooks = Hooks(progress=True, preview_every=opt.save_intermediates, preview_full=True,
                  on_preview=save_intermediate if opt.save_intermediates else None)
    all_pixels, notices, bar = [], [], None  # the bar is made after the first batch: an early error prints alone
    n_batches = params.n_iter * -(-len(params.prompt) // params.batch_size)
    for result in pipe.generate(params, hooks):
        notices = result.notices
        bar = bar or tqdm(total=n_batches, desc="batches", unit="batch", disable=n_batches == 1)
        if getattr(opt, "keep_only", None) is not None:
            result = result.only(opt.keep_only)
        for seed, flagged in zip(result.seeds, result.flagged):
            if flagged:
                say(f"kiln: the image with seed {seed} was flagged by the safety checker and replaced by a black image")
        if not opt.skip_save:
            for pixels, text, seed, prompt in zip(result.pixels, result.infotexts, result.seeds, result.prompts):
                meta = pnginfo_for(opt.metadata_format, text, dict(result.params, prompt=prompt, seed=seed,
                                                                    model=pipe.model_name, model_hash=pipe.model_hash))
                out.save_sample(Image.fromarray(pixels), meta)
        if not opt.skip_grid:
            all_pixels.append(result.pixels)
        bar.update(1)
    if bar is not None:
        bar.close()
    for note in dict.fromkeys(pipe.notices + notices):
        say(f"kiln: {note}")
    if not opt.skip_grid:
        grid = make_grid(np.concatenate(all_pixels), nrow=opt.n_rows or opt.n_samples)
        out.save_grid(Image.fromarray(put_watermark(grid, watermark) if watermark and can_watermark(grid)
                                      else grid))
