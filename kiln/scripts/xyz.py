"""A1111's "X/Y/Z plot": one generation per combination of up to three axes' values, drawn as a labelled grid.

script_args as A1111 1.10's scripts/xyz_grid.py (the same since 1.9): x_type, x_values, x_values_dropdown, y_type,
y_values, y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images,
include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode. An axis type
is an index into A1111 1.10's axis list *for the mode* (txt2img and img2img lists differ), or the axis' label.
"""
from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from ..errors import KilnError
from ..pipeline import GenerationParams
from ..pipeline.params import HIRES_UPSCALERS, hires_upscaler_key, hires_upscaler_name
from ..pipeline.upscalers import Upscalers
from ..samplers import SAMPLER_LIST, parse
from ..samplers.schedules import SCHEDULE_LABELS, resolve_schedule
from .base import Arg, Env, Output, Plan, Run, Runner, Script, add_fields, as_bool, as_number, image_result, \
    random_seed, watermarked, with_params
from .grid import Label, annotate, auto_rows, image_grid

TITLE = "X/Y/Z plot"
BOTH, T2I, I2I = ("txt2img", "img2img"), ("txt2img",), ("img2img",)


@dataclass(frozen=True)
class Axis:
    label: str
    type: str  # int | float | str | perm (permutations of the values)
    modes: tuple = BOTH
    apply: Callable | None = None  # (params, value, all values) -> params; None: kiln has no such setting yet
    fmt: str = "label"  # label ("Steps: 10") | value | join | nothing | basename
    cost: float = 0.0  # the costliest axis changes least often (a checkpoint switch)
    choices: Callable | None = None


def _field(name):
    return lambda p, x, xs: with_params(p, **{name: x})


def _prompt_sr(p, x, xs):
    def sub(text):
        return [t.replace(xs[0], x) for t in text] if isinstance(text, list) else text.replace(xs[0], x)
    return with_params(p, prompt=sub(p.prompt), negative_prompt=p.negative_prompt.replace(xs[0], x))


def _prompt_order(p, x, xs):
    """The tokens of `x` put back into the prompt in x's order, where the tokens stood."""
    prompt = p.prompt
    parts = []
    for _, token in sorted((prompt.find(t), t) for t in x):
        n = prompt.find(token)
        parts.append(prompt[:n])
        prompt = prompt[n + len(token):]
    return with_params(p, prompt="".join(part + token for part, token in zip(parts, x)) + prompt)


def _sampler(p, x, xs):
    spec, schedule = parse(x, None, lenient=True)
    return with_params(p, sampler=spec.name, schedule=schedule or p.schedule)


def _denoising(p, x, xs):
    return with_params(p, strength=x) if p.mode == "img2img" else with_params(p, hires_strength=x)


def _size(p, x, xs):
    w, h = _parse_size(x)
    return with_params(p, width=w, height=h)


def _parse_size(x):
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(x))
    if not m:
        raise KilnError(f"Size: {x!r} is not WIDTHxHEIGHT")
    return int(m[1]), int(m[2])


def _hires_upscaler(p, x, xs):
    return with_params(p, hires_upscaler=hires_upscaler_key(x))


def _sampler_names():
    return [s.label for s in SAMPLER_LIST]


def _schedule_names():
    return ["Automatic", *SCHEDULE_LABELS.values()]


# A1111 1.10's axis list, in its order (script_args name axes by their index in this list, filtered by mode).
AXES = [
    Axis("Nothing", "str", fmt="nothing"),
    Axis("Seed", "int", apply=_field("seed")),
    Axis("Var. seed", "int", apply=_field("subseed")),
    Axis("Var. strength", "float", apply=_field("subseed_strength")),
    Axis("Steps", "int", apply=_field("steps")),
    Axis("Hires steps", "int", T2I, _field("hires_steps")),
    Axis("CFG Scale", "float", apply=_field("cfg_scale")),
    Axis("Image CFG Scale", "float", I2I),
    Axis("Prompt S/R", "str", apply=_prompt_sr, fmt="value"),
    Axis("Prompt order", "perm", apply=_prompt_order, fmt="join"),
    Axis("Sampler", "str", T2I, _sampler, fmt="value", choices=_sampler_names),
    Axis("Hires sampler", "str", T2I),
    Axis("Sampler", "str", I2I, _sampler, fmt="value", choices=_sampler_names),
    Axis("Checkpoint name", "str", fmt="basename", cost=1.0, apply=lambda p, x, xs: p),
    Axis("Negative Guidance minimum sigma", "float"),
    Axis("Sigma Churn", "float"),
    Axis("Sigma min", "float"),
    Axis("Sigma max", "float"),
    Axis("Sigma noise", "float", apply=_field("s_noise")),
    Axis("Schedule type", "str", apply=_field("schedule"), choices=_schedule_names),
    Axis("Schedule min sigma", "float"),
    Axis("Schedule max sigma", "float"),
    Axis("Schedule rho", "float"),
    Axis("Skip Early CFG", "float"),
    Axis("Beta schedule alpha", "float"),
    Axis("Beta schedule beta", "float"),
    Axis("Eta", "float", apply=_field("eta")),
    Axis("Clip skip", "int", apply=_field("clip_skip")),
    Axis("Denoising", "float", apply=_denoising),
    Axis("Initial noise multiplier", "float"),
    Axis("Extra noise", "float"),
    Axis("Hires upscaler", "str", T2I, _hires_upscaler, choices=lambda: ["Latent", "Lanczos", "Nearest"]),
    Axis("Cond. Image Mask Weight", "float", I2I),
    Axis("VAE", "str", cost=0.7),
    Axis("Styles", "str"),
    Axis("UniPC Order", "int", cost=0.5),
    Axis("Face restore", "str", fmt="value"),
    Axis("Token merging ratio", "float"),
    Axis("Token merging ratio high-res", "float"),
    Axis("Always discard next-to-last sigma", "str"),
    Axis("SGM noise multiplier", "str"),
    Axis("Refiner checkpoint", "str", fmt="basename", cost=1.0),
    Axis("Refiner switch at", "float"),
    Axis("RNG source", "str"),
    Axis("FP8 mode", "str", cost=0.9),
    Axis("Size", "str", apply=_size),
]


def axes_for(mode: str) -> list[Axis]:
    return [a for a in AXES if mode in a.modes]


def supported(mode: str) -> list[str]:
    return [a.label for a in axes_for(mode) if a.apply is not None or a.label == "Nothing"]


def args(mode: str) -> list[Arg]:
    labels = tuple(a.label for a in axes_for(mode))
    out = []
    for letter, default in (("X", "Seed"), ("Y", "Nothing"), ("Z", "Nothing")):
        out += [Arg(f"{letter} type", default, choices=labels), Arg(f"{letter} values", ""),
                Arg(f"{letter} values", None)]
    out += [Arg("Draw legend", True), Arg("Include Sub Images", False), Arg("Include Sub Grids", False),
            Arg("Keep -1 for seeds", False), Arg("Vary seeds for X", False), Arg("Vary seeds for Y", False),
            Arg("Vary seeds for Z", False), Arg("Grid margins (px)", 0, 0, 500, 2),
            Arg("Use text inputs instead of dropdowns", False)]
    return out


# ---------------------------------------------------------------------------------------------- values
_INT_RANGE = re.compile(r"\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*([+-]\d+)\s*\)|\[\s*(\d+)\s*\])?\s*")
_NUM = r"\d+(?:\.\d*)?"
_FLOAT_RANGE = re.compile(rf"\s*([+-]?{_NUM})\s*-\s*([+-]?{_NUM})\s*(?:\(\s*([+-]{_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*")


def split_values(text: str) -> list[str]:
    """A1111's comma-separated values: CSV, so a value may be "quoted, with commas"; each one stripped."""
    return [v.strip() for row in csv.reader(io.StringIO(text)) for v in row]


def _expand(value: str, kind: str) -> list:
    """`1-5` (every integer), `1-10 (+2)` (by a step), `1-10 [5]` (that many evenly spaced), else the value."""
    m = (_INT_RANGE if kind == "int" else _FLOAT_RANGE).fullmatch(value)
    if m is None:
        return [value]
    num = int if kind == "int" else float
    start, end = num(m[1]), num(m[2])
    if m[4] is not None:  # [count]: evenly spaced, both ends included
        n = int(m[4])
        vals = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start][:n]
        return [int(v) for v in vals] if kind == "int" else [round(v, 10) for v in vals]
    step = num(m[3]) if m[3] is not None else 1
    if step == 0 or (end - start) * step < 0:
        raise KilnError(f"the range {value!r} never reaches its end")
    count = int((end - start) / step + 1e-9) + 1
    return [start + i * step if kind == "int" else round(start + i * step, 10) for i in range(count)]


def axis_values(axis: Axis, text, dropdown, csv_mode: bool, letter: str) -> list:
    """The values of an axis as A1111 reads them: the dropdown list for an axis with choices (unless csv_mode),
    else the text; ranges expanded, each value converted to the axis' type."""
    if axis.label == "Nothing":
        return [None]
    if axis.choices is not None and not csv_mode and dropdown:
        if not isinstance(dropdown, list):
            raise KilnError(f"{letter} values (dropdown): expected a list of values, got {dropdown!r}")
        raw = [str(v).strip() for v in dropdown]
    else:
        if not isinstance(text, str):
            raise KilnError(f"{letter} values: expected a text of comma-separated values, got {text!r}")
        raw = split_values(text)
    raw = [v for v in raw if v != ""] if axis.type in ("int", "float") else raw
    if axis.type == "perm":
        return [list(v) for v in itertools.permutations(raw)]
    out = []
    for v in raw:
        for x in (_expand(v, axis.type) if axis.type in ("int", "float") else [v]):
            out.append(as_number(x, f"{letter} values ({axis.label})", int if axis.type == "int" else float)
                       if axis.type in ("int", "float") else x)
    if not out:
        raise KilnError(f"{letter} values: no values for the {axis.label} axis")
    return out


def label(axis: Axis, x) -> str:
    if axis.fmt == "nothing":
        return ""
    if isinstance(x, float):
        x = round(x, 8)
    if axis.fmt == "join":
        return ", ".join(x)
    if axis.fmt == "basename":
        return PurePath(str(x)).name
    return str(x) if axis.fmt == "value" else f"{axis.label}: {x}"


# ---------------------------------------------------------------------------------------------- prepare
def find_axis(kind, mode: str, letter: str) -> Axis:
    """An axis by its index in A1111's list for the mode, or by its label; one kiln can vary."""
    options = axes_for(mode)
    if isinstance(kind, str) and kind.strip().lstrip("-").isdigit():
        kind = int(kind)
    if isinstance(kind, int) and not isinstance(kind, bool):
        if not 0 <= kind < len(options):
            raise KilnError(f"{letter} type: {kind} is not an axis of A1111's {mode} X/Y/Z plot "
                            f"(0 to {len(options) - 1})")
        axis = options[kind]
    else:
        axis = next((a for a in options if isinstance(kind, str) and a.label.lower() == kind.strip().lower()), None)
        if axis is None:
            raise KilnError(f"{letter} type: {kind!r} is not an axis of the {mode} X/Y/Z plot")
    if axis.apply is None and axis.label != "Nothing":
        raise KilnError(f"{letter} type: kiln cannot vary {axis.label!r} yet; it varies "
                        f"{', '.join(supported(mode)[1:])}")
    return axis


def confirm(axis: Axis, xs: list, base: GenerationParams, env: Env, letter: str) -> list:
    """The values checked before anything runs (A1111's `confirm`), in the form the axis applies them."""
    what = f"{letter} values ({axis.label})"
    if axis.label == "Sampler":
        for x in xs:
            try:
                parse(x, None, lenient=True)
            except ValueError as e:
                raise KilnError(f"{what}: {e}") from None
    elif axis.label == "Schedule type":
        try:
            return [resolve_schedule(x) for x in xs]
        except ValueError as e:
            raise KilnError(f"{what}: {e}") from None
    elif axis.label == "Checkpoint name":
        found = [env.find_model(x) if env.find_model else None for x in xs]
        for x, f in zip(xs, found):
            if f is None:
                raise KilnError(f"{what}: unknown checkpoint {x!r}")
        return found
    elif axis.label == "Prompt S/R":
        prompts = base.prompt if isinstance(base.prompt, list) else [base.prompt]
        if not any(xs[0] in t for t in [*prompts, base.negative_prompt]):
            raise KilnError(f"{what}: {xs[0]!r} is in neither the prompt nor the negative prompt")
    elif axis.label == "Prompt order":
        if isinstance(base.prompt, list) or any(t not in base.prompt for t in xs[0]):
            raise KilnError(f"{what}: every token must be in the prompt")
    elif axis.label == "Hires upscaler":  # Latent (any latent mode), or an upscaler's name (a model's too)
        return [_hires_upscaler_value(x, env, what) for x in xs]
    elif axis.label == "Size":
        for x in xs:
            _parse_size(x)
    if env.mode == "txt2img" and base.hires_scale is None and axis.label in ("Hires steps", "Hires upscaler",
                                                                           "Denoising"):
        raise KilnError(f"{what}: the {axis.label} axis changes the hires fix, which this request does not use")
    return xs


def _hires_upscaler_value(x, env: Env, what: str) -> str:
    if hires_upscaler_key(x) in HIRES_UPSCALERS:
        return hires_upscaler_name(hires_upscaler_key(x))
    try:
        return (env.upscalers or Upscalers()).canonical(x, env.upscaler_files)
    except KilnError as e:
        raise KilnError(f"{what}: {e}") from None


def _fix_seeds(axis: Axis, xs: list, fixed: bool) -> list:
    """A Seed axis' -1 (or empty) values made real seeds, one per value (A1111's "fixed seeds")."""
    if axis.label not in ("Seed", "Var. seed") or not fixed:
        return xs
    return [random_seed() if x in (None, "", -1) else x for x in xs]


def prepare(a: list, base: GenerationParams, env: Env) -> Plan:
    (x_type, x_text, x_dd, y_type, y_text, y_dd, z_type, z_text, z_dd, legend, lone, sub_grids, no_fixed,
     vary_x, vary_y, vary_z, margin, csv_mode) = a
    csv_mode, no_fixed = as_bool(csv_mode, "csv_mode"), as_bool(no_fixed, "no_fixed_seeds")
    axes, values, labels, texts = [], [], [], []
    for letter, kind, text, dd in (("X", x_type, x_text, x_dd), ("Y", y_type, y_text, y_dd),
                                   ("Z", z_type, z_text, z_dd)):
        axis = find_axis(kind, env.mode, letter)
        shown = _fix_seeds(axis, axis_values(axis, text, dd, csv_mode, letter), not no_fixed)
        if axis.choices is not None and not csv_mode and dd:
            text = ",".join(dd)
        axes.append(axis)
        values.append(confirm(axis, shown, base, env, letter))
        labels.append([label(axis, x) for x in shown])
        texts.append(text)
    vary = [as_bool(v, f"vary_seeds_{k}") for v, k in zip((vary_x, vary_y, vary_z), "xyz")]
    runs = _cells(axes, values, base, vary, random_each=no_fixed and env.seed_random)
    data = dict(axes=[a.label for a in axes], values=values, texts=texts, labels=labels, order=_order(axes),
                legend=as_bool(legend, "draw_legend"), lone=as_bool(lone, "include_lone_images"),
                sub_grids=as_bool(sub_grids, "include_sub_grids"), no_fixed=no_fixed,
                margin=as_number(margin, "margin_size", int, 0, 500))
    return Plan("x/y/z plot", runs, data)


def _cells(axes, values, base, vary, random_each: bool) -> list[Run]:
    """One run per cell, index x + y·nx + z·nx·ny, each axis' value applied in X, Y, Z order."""
    xs, ys, zs = values
    runs = []
    for (iz, z), (iy, y), (ix, x) in itertools.product(enumerate(zs), enumerate(ys), enumerate(xs)):
        p, model = base, None
        if random_each:  # "Keep -1 for seeds" with a random seed asked for: every cell draws its own
            p = with_params(p, seed=random_seed())
        for axis, v, vs in zip(axes, (x, y, z), values):
            if axis.label == "Checkpoint name":
                model = v
            elif axis.label != "Nothing":
                p = axis.apply(p, v, vs)
        nx = len(xs) if vary[0] else 1
        ny = len(ys) if vary[1] else 1
        offset = (ix if vary[0] else 0) + (iy * nx if vary[1] else 0) + (iz * nx * ny if vary[2] else 0)
        runs.append(Run(with_params(p, seed=p.seed + offset) if offset else p, model))
    return runs


def _order(axes) -> list[int]:
    """The axes from outermost to innermost loop: the costliest outside (a checkpoint loads once per value);
    among equals Z, then Y, then X, as A1111."""
    return sorted((2, 1, 0), key=lambda i: -axes[i].cost)


# ---------------------------------------------------------------------------------------------- run
def run(plan: Plan, runner: Runner) -> Output:
    d = plan.data
    nx, ny, nz = (len(v) for v in d["values"])
    results = [None] * len(plan.runs)
    ranges = {0: range(nx), 1: range(ny), 2: range(nz)}
    outer, middle, inner = d["order"]
    for i in ranges[outer]:
        for j in ranges[middle]:
            for k in ranges[inner]:
                pos = {outer: i, middle: j, inner: k}
                idx = pos[0] + pos[1] * nx + pos[2] * nx * ny
                results[idx] = runner.generate(plan.runs[idx])
    cells = [r.images[0] if len(r.images) == 1 else image_grid(r.images, auto_rows(len(r.images)))
             for r in results]
    x_labels, y_labels, z_labels = d["labels"]
    sub_grids, texts = [], []
    for iz in range(nz):
        part = cells[iz * nx * ny:(iz + 1) * nx * ny]
        g = image_grid(part, rows=ny)
        if d["legend"]:
            w, h = (max(s) for s in zip(*(im.size for im in part)))
            g = annotate(g, w, h, [[Label(t)] for t in x_labels], [[Label(t)] for t in y_labels], d["margin"])
        sub_grids.append(g)
        texts.append(add_fields(results[iz * nx * ny].infotexts[0], _fields(d, ("X", "Y"))))
    z_grid = image_grid(sub_grids, rows=1)
    if d["legend"]:
        w, h = (max(s) for s in zip(*(im.size for im in sub_grids)))
        z_grid = annotate(z_grid, w, h, [[Label(t)] for t in z_labels], [[Label("")]])
    base = plan.runs[0].params
    main = add_fields(results[0].infotexts[0], _fields(d, ("X", "Y", "Z")))
    grids = [image_result(watermarked(z_grid, base, runner.pipe), main, results[0])]
    if d["sub_grids"]:
        grids += [image_result(watermarked(g, base, runner.pipe), t, results[iz * nx * ny])
                  for iz, (g, t) in enumerate(zip(sub_grids, texts))]
    return Output(grids + (results if d["lone"] else []), len(grids))


def _fields(d: dict, letters) -> dict:
    """A1111's infotext of a grid: the script, each used axis' type and values (and the seeds it fixed)."""
    out = {"Script": TITLE}
    for letter in letters:
        i = "XYZ".index(letter)
        if d["axes"][i] == "Nothing":
            continue
        out[f"{letter} Type"] = d["axes"][i]
        out[f"{letter} Values"] = d["texts"][i]
        if d["axes"][i] in ("Seed", "Var. seed") and not d["no_fixed"]:
            out[f"Fixed {letter} Values"] = ", ".join(str(v) for v in d["values"][i])
    return out


SCRIPT = Script(TITLE, BOTH, args, prepare, run)
