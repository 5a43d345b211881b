"""ControlNet flags of `kiln txt2img`/`img2img`/`inpaint`: one unit per `--controlnet`, in order; each per-unit flag
is given once (every unit) or once per unit."""
from __future__ import annotations

from ..errors import KilnError

PER_UNIT = (  # (flag, dest, type, unit field, help)
    ("--control-image", "control_image", str, "image", "the control image of each unit (edges, a pose, depth…)"),
    ("--control-weight", "control_weight", float, "weight", "how strongly each unit steers (default 1)"),
    ("--control-start", "control_start", float, "start", "the fraction of the steps a unit starts at (default 0)"),
    ("--control-end", "control_end", float, "end", "the fraction of the steps a unit ends at (default 1)"),
    ("--control-preprocessor", "control_preprocessor", str, "module",
     "turns the image into the control map first: none (default), canny, invert, threshold, tile_resample …"),
    ("--control-resize", "control_resize", str, "resize_mode",
     "how the control map is fitted to the picture: 'Crop and Resize' (default), 'Just Resize', 'Resize and Fill'"),
    ("--control-res", "control_res", int, "processor_res", "the preprocessor's resolution (default: pixel perfect)"),
    ("--control-threshold-a", "control_threshold_a", float, "threshold_a", "the preprocessor's first slider "
     "(canny: low threshold)"),
    ("--control-threshold-b", "control_threshold_b", float, "threshold_b", "the preprocessor's second slider "
     "(canny: high threshold)"),
)


def add_control_flags(p):
    g = p.add_argument_group("ControlNet (repeat --controlnet for several units)")
    g.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                   help="a ControlNet file (lllyasviel's layout, .safetensors or .pth): one unit each")
    for flag, dest, kind, _, help_ in PER_UNIT:
        g.add_argument(flag, dest=dest, action="append", type=kind, default=[], help=help_)


def control_units(opt) -> list:
    """The units the flags describe (`kiln.pipeline.control.ControlUnit`), or a one-line error."""
    from ..pipeline.control import ControlUnit

    files = getattr(opt, "controlnet", None) or []
    given = {dest: getattr(opt, dest, []) for _, dest, *_ in PER_UNIT}
    if not files:
        stray = [flag for flag, dest, *_ in PER_UNIT if given[dest]]
        if stray:
            raise KilnError(f"{stray[0]} needs --controlnet FILE")
        return []
    if not given["control_image"]:
        raise KilnError("--controlnet needs --control-image IMG")
    units = [{"model": f} for f in files]
    for flag, dest, _, field, _ in PER_UNIT:
        values = given[dest]
        if len(values) not in (0, 1, len(files)):
            raise KilnError(f"{flag} is given {len(values)} times for {len(files)} ControlNet units: give it once "
                            "(for every unit) or once per unit")
        for k, unit in enumerate(units):
            if values:
                unit[field] = values[k if len(values) > 1 else 0]
    return [ControlUnit(**u) for u in units]
