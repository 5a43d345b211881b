"""`kiln upscale IMAGE... --model NAME_OR_FILE`: A1111's Extras upscale from the command line. Each picture goes
through `kiln.pipeline.extras` (a model upscaler in tiles, or Lanczos / Nearest; a second upscaler blended in) and
is written to OUTDIR/<stem>.png with the source's parameters and A1111's "postprocessing" and "extras" text.

Everything is checked before anything is written: the upscalers' names, every image (readable, not too large,
two different stems), and the result sizes; then the models load, then the pictures are processed one by one."""
from __future__ import annotations

from pathlib import Path

from ..errors import KilnError
from .common import add_precision_flag, say

MAX_OUTPUT_PIXELS = 16384 * 16384


def upscale_parser(sub):
    from ..pipeline.upscale import DEFAULT_OVERLAP, DEFAULT_TILE

    p = sub.add_parser("upscale", help="upscale images with ESRGAN/Real-ESRGAN/SwinIR/DAT models or Lanczos "
                       "(A1111's Extras)", description="Upscale images as A1111's Extras tab: a model upscaler (a "
                       "file, or its name in --upscaler-dir, models/ESRGAN, models/RealESRGAN, models/SwinIR, "
                       "models/DAT) or Lanczos / Nearest, optionally blended with a second upscaler.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, metavar="NAME_OR_FILE",
                   help="the upscaler: Lanczos, Nearest, a model upscaler's name or its .pth/.safetensors file")
    p.add_argument("--scale", type=float, default=None,
                   help="resize by this factor (default: the model's own scale; 2 for Lanczos and Nearest)")
    p.add_argument("--model2", default="None", metavar="NAME_OR_FILE", help="a second upscaler, blended in")
    p.add_argument("--visibility2", type=float, default=0.5, help="how much of --model2 shows (0 … 1, default 0.5)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"a model runs on tiles of this many input pixels a side (0: whole; default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"pixels by which tiles overlap, blended (default {DEFAULT_OVERLAP})")
    p.add_argument("--outdir", default="outputs/extras", help="where OUTDIR/<stem>.png go (default outputs/extras)")
    p.add_argument("--upscaler-dir", dest="upscaler_dir", default=None, metavar="DIR",
                   help="more model upscaler files, found by name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    add_precision_flag(p)
    return p


def _check(opt, ups):
    """(upscaler 1, upscaler 2, the scale) once the flags make sense."""
    if opt.tile and not 0 <= opt.overlap < opt.tile // 2:
        raise KilnError(f"--overlap must be at least 0 and under half of --tile ({opt.tile}), got {opt.overlap}")
    if opt.tile < 0:
        raise KilnError(f"--tile must be 0 (whole pictures) or a number of pixels, got {opt.tile}")
    if not 0 <= opt.visibility2 <= 1:
        raise KilnError(f"--visibility2 must be in [0, 1], got {opt.visibility2}")
    if opt.upscaler_dir and not Path(opt.upscaler_dir).is_dir():
        raise KilnError(f"--upscaler-dir {opt.upscaler_dir}: not a folder")
    first, second = ups.find(opt.model), ups.find(opt.model2)
    if first == "None":
        raise KilnError("--model None would leave the pictures as they are; give an upscaler")
    if opt.scale is not None and not 0 < opt.scale <= 16:
        raise KilnError(f"--scale must be above 0 and at most 16, got {opt.scale:g}")
    return first, second


def _sources(paths: list[str]):
    """(path, image) of every input, read and checked before anything is written."""
    from ..images import load_image

    stems = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise KilnError(f"{stems[stem]} and {path} would both be written as {stem}.png; upscale them separately")
        stems[stem] = path
    out = []
    for path in paths:
        image = load_image(path, "image")
        image.info = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        out.append((Path(path), image))
    return out


def run_upscale(opt):
    from ..output.files import save_png_atomic
    from ..pipeline.extras import ExtrasUpscale, dest_size, extras_upscale
    from ..pipeline.upscalers import Upscalers

    ups = Upscalers(opt.upscaler_dir, device=opt.device, precision=opt.precision, tile=opt.tile,
                    overlap=opt.overlap, progress=True)
    first, second = _check(opt, ups)
    sources = _sources(opt.images)
    scale = opt.scale if opt.scale is not None else 2.0 if isinstance(first, str) else None
    if scale is None:
        scale = ups.load(first).scale  # the model's own; loading it checks the file
    for path, image in sources:
        try:
            dest_size(image, scale, MAX_OUTPUT_PIXELS)
        except KilnError as e:
            raise KilnError(f"{path}: {e}") from None
    for m in (first, second):  # a bad file fails here, before anything is written
        if not isinstance(m, str):
            ups.load(m)
    x = ExtrasUpscale(opt.model, opt.model2, opt.visibility2 if second != "None" else 0.0, scale)
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for path, image in sources:
        out, text = extras_upscale(image, x, ups, MAX_OUTPUT_PIXELS)
        target = outdir / f"{path.stem}.png"
        save_png_atomic(out, target, _pnginfo({**out.info, "extras": text}))
        say(f"kiln: {path} -> {target} ({out.width}x{out.height}; {text})")
    return 0


def _pnginfo(chunks: dict):
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        meta.add_text(k, v)
    return meta
