"""A1111's "SD upscale" (img2img): upscale the init image with a named upscaler, re-render it with img2img in
overlapping tiles of the request's width x height, and blend the tiles back together.

script_args as A1111's scripts/sd_upscale.py: [info (ignored), overlap, upscaler (name, or index in
/sdapi/v1/upscalers' order: the resamplers, then the model upscalers found), scale_factor]. As A1111: the upscaler
"None" leaves the picture at its size (the tiles re-render it as it is); each of n_iter passes starts from
seed + n; the tile batches of batch_size b take seeds start + k (+ j for the j-th tile of batch k)."""
from __future__ import annotations

import math

from ..errors import KilnError
from ..images import load_image
from ..pipeline import GenerationParams
from ..pipeline.upscalers import Upscalers
from ..upscalers import NAMES
from .base import Arg, Env, Output, Plan, Run, Runner, Script, add_fields, as_number, image_result, watermarked, \
    with_params
from .grid import combine_tiles, split_tiles

TITLE = "SD upscale"


def args(mode: str) -> list[Arg]:
    return [Arg("Info", None), Arg("Tile overlap", 64, 0, 256, 16), Arg("Upscaler", NAMES[0], choices=NAMES),
            Arg("Scale Factor", 2.0, 0, 4, 1)]


def upscaler_name(v, env: Env) -> str:
    ups = env.upscalers or Upscalers()
    if isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, str) and v.strip().isdigit():
        i = as_number(v, "upscaler", int)
        names = ups.names()
        if not 0 <= i < len(names):
            raise KilnError(f"upscaler: index {i} is not one of kiln's upscalers (0 to {len(names) - 1}: "
                            f"{', '.join(names)})")
        return names[i]
    if not isinstance(v, str):
        raise KilnError(f"upscaler: expected a name or an index, got {v!r}")
    return ups.canonical(v, env.upscaler_files)


def prepare(a: list, base: GenerationParams, env: Env) -> Plan:
    _, overlap, upscaler, scale = a
    name = upscaler_name(upscaler, env)
    scale = as_number(scale, "scale_factor", float, 0, 16)
    if base.mask is not None or base.outpaint is not None:
        raise KilnError("SD upscale re-renders the whole picture; it takes no mask")
    image = load_image(base.init_image, "init image")
    w, h = image.size
    if name != "None":  # A1111: the upscaler's target, rounded down to a multiple of 8
        w, h = int(w * scale) // 8 * 8, int(h * scale) // 8 * 8
        if min(w, h) < 8 or scale <= 0:
            raise KilnError(f"scale_factor {scale:g} leaves no picture to upscale")
    if env.bounds.max_pixels is not None and w * h > env.bounds.max_pixels:
        raise KilnError(f"the upscaled picture, {w}x{h}, is larger than this server's limit of "
                        f"{env.bounds.max_pixels:,} pixels")
    unit = env.size_unit
    # a tile larger than the picture shrinks to it (A1111 would render mostly black padding)
    tile_w = min(base.width or env.native_size, math.ceil(w / unit) * unit)
    tile_h = min(base.height or env.native_size, math.ceil(h / unit) * unit)
    overlap = as_number(overlap, "overlap", int, 0, max(0, min(tile_w, tile_h) - 1))
    big = (env.upscalers or Upscalers()).upscale(image, w, h, name)
    tiles, crops = split_tiles(big, tile_w, tile_h, overlap)
    runs = []
    for n in range(base.n_iter):
        for i, crop in enumerate(crops):
            k, j = divmod(i, base.batch_size)
            runs.append(Run(with_params(base, init_image=crop, width=tile_w, height=tile_h, batch_size=1, n_iter=1,
                                        resize_mode="just-resize", seed=base.seed + n + k + j)))
    return Plan("sd upscale", runs, dict(tiles=tiles, upscaler=name, overlap=overlap, passes=base.n_iter))


def run(plan: Plan, runner: Runner) -> Output:
    d = plan.data
    per_pass = len(plan.runs) // d["passes"]
    out = []
    for n in range(d["passes"]):
        parts = [runner.generate(r) for r in plan.runs[n * per_pass:(n + 1) * per_pass]]
        picture = watermarked(combine_tiles(d["tiles"], [r.images[0] for r in parts]), plan.runs[0].params,
                              runner.pipe)
        text = add_fields(parts[0].infotexts[0], {"SD upscale overlap": d["overlap"],
                                                  "SD upscale upscaler": d["upscaler"]})
        out.append(image_result(picture, text, parts[0], flagged=any(f for r in parts for f in r.flagged)))
    return Output(out)


SCRIPT = Script(TITLE, ("img2img",), args, prepare, run)
