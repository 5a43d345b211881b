"""A1111's scripts on the command line (`kiln.scripts`, docs/scripts.md): `--xyz AXIS:VALUES` (up to three: X, Y,
Z), `--prompt-matrix`, `--sd-upscale SCALE` (img2img), any script by `--script NAME --script-arg V …` in A1111's
argument order, and `--from-file` lines carrying A1111's `--steps 10 …` options. Grids and images are saved through
`kiln.output` as every other image, each with its infotext."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KilnError
from .common import say


class Default(int):
    """A count flag's default, as opposed to the same number given on the command line."""


def add_script_flags(p, command: str):
    g = p.add_argument_group("A1111 scripts", "one per run; see docs/scripts.md")
    g.add_argument("--xyz", action="append", default=[], metavar="AXIS:VALUES",
                   help='an X/Y/Z plot axis, e.g. "Steps:10,20,30" or "CFG Scale:5-9 (+2)"; up to three (X, Y, Z)')
    g.add_argument("--xyz-no-legend", dest="xyz_no_legend", action="store_true", help="no axis labels on the grid")
    g.add_argument("--xyz-sub-grids", dest="xyz_sub_grids", action="store_true",
                   help="also save the grid of each Z value")
    g.add_argument("--xyz-margin", dest="xyz_margin", type=int, default=0, help="pixels between the grid's cells")
    g.add_argument("--xyz-vary-seeds", dest="xyz_vary_seeds", default="", metavar="AXES",
                   help='axes along which the seed grows by one per cell, e.g. "x" or "xy"')
    g.add_argument("--prompt-matrix", dest="prompt_matrix", action="store_true",
                   help='every combination of the prompt\'s "|" parts, and a labelled grid')
    if command != "txt2img":
        g.add_argument("--sd-upscale", dest="sd_upscale", type=float, default=None, metavar="SCALE",
                       help="upscale the init image by SCALE, then re-render it in --W x --H tiles")
        g.add_argument("--upscaler", default="Lanczos", help="the upscaler for --sd-upscale: None, Lanczos, Nearest, "
                       "a model upscaler's name (--upscaler-dir, models/ESRGAN, …) or file")
        g.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels for --sd-upscale")
    g.add_argument("--script", default=None, metavar="NAME",
                   help='any A1111 script by its title, e.g. "x/y/z plot", with --script-arg values in its order')
    g.add_argument("--script-arg", dest="script_arg", action="append", default=[], metavar="VALUE",
                   help="one of --script's arguments, in A1111's order (JSON: 4, true, \"text\"; else text)")


def _xyz_args(opt) -> list:
    if len(opt.xyz) > 3:
        raise KilnError(f"--xyz: at most three axes (X, Y, Z), got {len(opt.xyz)}")
    axes = []
    for spec in opt.xyz:
        kind, sep, values = spec.partition(":")
        if not sep or not kind.strip():
            raise KilnError(f'--xyz wants AXIS:VALUES such as "Steps:10,20", not {spec!r}')
        axes.append((kind.strip(), values))
    axes += [("Nothing", "")] * (3 - len(axes))
    unknown = set(opt.xyz_vary_seeds.lower()) - set("xyz")
    if unknown:
        raise KilnError(f"--xyz-vary-seeds takes the letters x, y and z, not {opt.xyz_vary_seeds!r}")
    flags = [not opt.xyz_no_legend, True, opt.xyz_sub_grids, False,
             *(letter in opt.xyz_vary_seeds.lower() for letter in "xyz"), opt.xyz_margin, True]
    return [v for kind, values in axes for v in (kind, values, None)] + flags


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def option_lines(path: str) -> str | None:
    """The text of a --from-file whose lines carry A1111's options (a line starting with --), else None."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # read_prompts says what is wrong with it
    return text if any(line.strip().startswith("--") for line in text.splitlines()) else None


def script_request(opt) -> tuple[str, list] | None:
    """The script the flags ask for, as A1111's (name, script_args), or None."""
    chosen = []
    if opt.xyz:
        chosen.append(("x/y/z plot", _xyz_args(opt)))
    if opt.prompt_matrix:
        chosen.append(("prompt matrix", []))
    if getattr(opt, "sd_upscale", None) is not None:
        chosen.append(("sd upscale", ["", opt.overlap, opt.upscaler, opt.sd_upscale]))
    if opt.script:
        chosen.append((opt.script, [_value(v) for v in opt.script_arg]))
    elif opt.script_arg:
        raise KilnError("--script-arg needs --script NAME")
    text = option_lines(opt.from_file) if opt.from_file else None
    if text is not None:
        chosen.append(("prompts from file or textbox", [False, False, "start", text]))
    if len(chosen) > 1:
        raise KilnError("one script at a time: " + ", ".join(name for name, _ in chosen))
    if chosen and opt.from_png:
        raise KilnError("--from-png makes one image again; it takes no script")
    if chosen and opt.from_file and text is None:
        raise KilnError("--from-file (a prompt per line) and a script do not combine; a file whose lines carry "
                        "A1111's options (--prompt … --steps …) is a script itself")
    return chosen[0] if chosen else None


def counts(opt):
    """With a script, --n_samples and --n_iter default to 1 (CompVis' 3 and 2 would make each cell a batch)."""
    for name in ("n_samples", "n_iter"):
        if isinstance(getattr(opt, name), Default):
            setattr(opt, name, 1)


def run_script(opt, pipe, params, out, request):
    """Plan and run the script, then save its grids (as grids) and images (as samples) with their infotexts."""
    from dataclasses import replace

    from .. import scripts
    from ..output import pnginfo_for
    from ..pipeline import Hooks
    from .generate import load_for

    name, args = request
    mode = "txt2img" if opt.command == "txt2img" else "img2img"
    base = replace(params, prompt="" if name == "prompts from file or textbox" else opt.prompt)

    def find_model(ckpt):
        return str(Path(ckpt)) if Path(ckpt).exists() else None

    def load_model(ckpt):
        say(f"kiln: loading {ckpt}")
        return load_for(type(opt)(**{**vars(opt), "ckpt": ckpt}))

    env = scripts.Env(mode, pipe.native_size, max(8, pipe.cfg.downscale), pipe.max_clip_skip, find_model=find_model,
                      upscalers=pipe.upscalers)
    plan = scripts.prepare(name, args, base, env)
    say(f"kiln: {scripts.find(name).title}: {len(plan.runs)} generation{'s' * (len(plan.runs) != 1)}")
    output = scripts.run(plan, scripts.Runner(pipe, Hooks(progress=True), load_model))
    for i, result in enumerate(output.results):
        grid = i < output.grids
        if grid and opt.skip_grid or not grid and opt.skip_save:
            continue
        for image, text, seed, prompt in zip(result.images, result.infotexts, result.seeds, result.prompts):
            meta = pnginfo_for(opt.metadata_format, text, dict(result.params, prompt=prompt, seed=seed,
                                                                model=pipe.model_name, model_hash=pipe.model_hash))
            (out.save_grid if grid else out.save_sample)(image, meta)
    for note in dict.fromkeys(n for r in output.results for n in r.notices):
        say(f"kiln: {note}")
