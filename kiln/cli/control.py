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
    ("--control-mode", "control_mode", str, "control_mode",
     "'Balanced' (default), 'My prompt is more important' or 'ControlNet is more important' (or 0, 1, 2)"),
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
                   help="a ControlNet file (lllyasviel's layout, .safetensors or .pth), or 'demo' (the embedded demo "
                        "model's canny ControlNet): one unit each")
    g.add_argument("--controlnet-dir", dest="controlnet_dir", default=None, metavar="DIR",
                   help="where --from-png looks up the ControlNets an image names (default: models/ControlNet "
                        "when it exists)")
    for flag, dest, kind, _, help_ in PER_UNIT:
        g.add_argument(flag, dest=dest, action="append", type=kind, default=[], help=help_)


def demo_controlnet(name: str) -> str:
    """`--controlnet demo`: the embedded demo ControlNet (for the embedded demo model), unless a file is so named."""
    from pathlib import Path

    from ..demo.control_report import EMBEDDED_CONTROLNET

    return str(EMBEDDED_CONTROLNET) if name == "demo" and not Path(name).exists() else name


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
    units = [{"model": demo_controlnet(f)} for f in files]
    for flag, dest, _, field, _ in PER_UNIT:
        values = given[dest]
        if len(values) not in (0, 1, len(files)):
            raise KilnError(f"{flag} is given {len(values)} times for {len(files)} ControlNet units: give it once "
                            "(for every unit) or once per unit")
        for k, unit in enumerate(units):
            if values:
                unit[field] = values[k if len(values) > 1 else 0]
    return [ControlUnit(**u) for u in units]


def units_from_png(opt, info: dict, say) -> None:
    """--from-png: the units the image's infotext records become the unit flags (module, weight, start/end, resize,
    resolution, thresholds, control mode); their models are `--controlnet` (one per unit) or found by the recorded
    title in --controlnet-dir. The infotext keeps no control image: --control-image must give them again."""
    from ..checkpoints.controlnet_index import ControlNetIndex
    from ..pipeline.control import units_from_infotext

    units = units_from_infotext(info)
    if not units:
        return
    n, images = len(units), opt.control_image
    if len(images) not in (1, n):
        raise KilnError(f"the image was made with {n} ControlNet unit{'s' * (n > 1)}; its infotext does not keep "
                        f"control images: pass --control-image once {'per unit, in order' if n > 1 else ''}".rstrip())
    files = opt.controlnet
    if files and len(files) != n:
        raise KilnError(f"the image was made with {n} ControlNet units: give --controlnet {n} times, or none (they "
                        "are then looked up by name in --controlnet-dir)")
    if not files:
        from ..demo.control_report import EMBEDDED_CONTROLNET

        index = ControlNetIndex.for_config(opt.controlnet_dir, [EMBEDDED_CONTROLNET])
        files = []
        for k, u in enumerate(units):
            entry = index.find(u["model"])
            if entry is None:
                where = f"in {index.folder}" if index.folder else "(no --controlnet-dir, and no models/ControlNet)"
                raise KilnError(f"ControlNet {k}: {u['model']} is not found {where}; pass --controlnet FILE")
            if entry.title != u["model"]:
                say(f"kiln: note: ControlNet {k} was {u['model']}; using {entry.title}")
            files.append(entry.path)
    opt.controlnet = list(files)
    for _, dest, _, field, _ in PER_UNIT:  # a field a unit does not record: None, the unit's default
        if field != "image":
            setattr(opt, dest, [u.get(field) for u in units])
