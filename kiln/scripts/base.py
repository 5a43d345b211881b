"""What every script shares: its description (`Script`, `Arg`), what it may ask for (`Env`, `Bounds`), the
generations it plans (`Run`), how it runs them (`Runner`) and what it returns (`Output`).

A script works in two steps, so that a server can refuse a bad request before queueing it: `prepare` reads A1111's
positional `script_args` against the base `GenerationParams` and plans every generation (a `Plan` with its `runs`),
raising a one-line `KilnError` for a bad argument; `run` makes the planned generations with a `Runner` and
assembles grids and images in A1111's order."""
from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from ..errors import KilnError
from ..pipeline import GenerationParams, Result, join
from ..pipeline.infotext import quote

MAX_SEED = 4294967294  # A1111's random seeds are below this


@dataclass(frozen=True)
class Arg:
    """One of a script's arguments, in A1111's UI order (what `/sdapi/v1/script-info` lists)."""
    label: str
    value: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | None = None

    def info(self) -> dict:
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(self.choices) if self.choices is not None else None}


@dataclass
class Bounds:
    """What one script run may ask for (a server's limits; None: no limit)."""
    max_steps: int | None = None
    max_size: int | None = None
    max_batch_size: int | None = None
    max_n_iter: int | None = None
    max_images: int | None = None  # images made by all of a script's generations together
    max_pixels: int | None = None  # an image a script makes itself (SD upscale's upscaled picture)


@dataclass
class Env:
    """What `prepare` knows besides the arguments: the mode, the loaded model's facts, the limits, how to find a
    checkpoint by name, and whether the request asked for a random seed (-1)."""
    mode: str
    native_size: int = 512
    size_unit: int = 8
    clip_layers: int | None = None
    bounds: Bounds = field(default_factory=Bounds)
    find_model: Callable[[str], str | None] | None = None  # a checkpoint's name as the front end knows it
    seed_random: bool = False
    upscalers: Any = None  # kiln.pipeline.upscalers.Upscalers (SD upscale's); None: a registry of models/ESRGAN, …
    upscaler_files: bool = True  # whether an upscaler may be a file's path (a server takes names only)


@dataclass
class Run:
    """One planned generation: its parameters, and the checkpoint to switch to first (None: the current one)."""
    params: GenerationParams
    model: str | None = None


@dataclass
class Plan:
    """A prepared script: its name, the generations to make, and what its `run` needs besides."""
    script: str
    runs: list[Run]
    data: dict = field(default_factory=dict)


@dataclass
class Output:
    """A script's results in A1111's order: the first `grids` results are grids (one image each), then the
    images."""
    results: list[Result]
    grids: int = 0

    @property
    def images(self) -> list:
        return [im for r in self.results for im in r.images]

    @property
    def infotexts(self) -> list[str]:
        return [t for r in self.results for t in r.infotexts]


@dataclass(frozen=True)
class Script:
    title: str  # A1111's title; the API finds a script by its lowercase form
    modes: tuple[str, ...]
    args: Callable[[str], list[Arg]]  # the arguments for a mode (the X/Y/Z plot's axis choices differ by mode)
    prepare: Callable[[list, GenerationParams, Env], Plan]
    run: Callable[[Plan, Runner], Output]

    @property
    def name(self) -> str:
        return self.title.lower()


class Runner:
    """How a script's generations run in a front end: its pipeline and hooks, a way to switch checkpoints
    (`load_model(name) -> Pipeline`), and `on_run(i, n)` before the i-th of n generations (progress)."""

    def __init__(self, pipe, hooks=None, load_model=None, on_run=None):
        self.pipe, self.hooks, self._load_model, self.on_run = pipe, hooks, load_model, on_run
        self.model = None  # the checkpoint a run switched to (None: the one the front end started with)
        self.done, self.total = 0, 0

    def generate(self, run: Run) -> Result:
        if run.model is not None and run.model != self.model:
            if self._load_model is None:
                raise KilnError("this front end cannot switch checkpoints inside a script")
            self.pipe, self.model = self._load_model(run.model), run.model
        if self.on_run is not None:
            self.on_run(self.done, self.total)
        result = join(list(self.pipe.generate(run.params, self.hooks)))
        self.done += 1
        return result


# ---------------------------------------------------------------------------------------------- arguments
def as_bool(v, label: str) -> bool:
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", ""):
        return v.strip().lower() in ("true", "1")
    raise KilnError(f"{label}: expected true or false, got {v!r}")


def as_number(v, label: str, kind=float, lo=None, hi=None):
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
        if not math.isfinite(x) or kind is int and x != int(x):
            raise ValueError
    except (TypeError, ValueError):
        raise KilnError(f"{label}: expected {'an integer' if kind is int else 'a number'}, got {v!r}") from None
    x = kind(x)
    if lo is not None and x < lo or hi is not None and x > hi:
        raise KilnError(f"{label} must be between {lo:g} and {hi:g}, got {x:g}")
    return x


def as_choice(v, label: str, choices) -> str:
    for c in choices:
        if isinstance(v, str) and v.strip().lower() == c.lower():
            return c
    raise KilnError(f"{label}: {v!r} is not one of {', '.join(choices)}")


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED)


def check_runs(plan: Plan, env: Env):
    """Every planned generation within the limits (what a request alone is held to, and images in all)."""
    b = env.bounds
    images = 0
    for run in plan.runs:
        p = run.params
        images += p.batch_size * p.n_iter * (len(p.prompt) // p.batch_size if isinstance(p.prompt, list) else 1)
        if b.max_steps is not None and not 1 <= p.steps <= b.max_steps:
            raise KilnError(f"steps must be between 1 and {b.max_steps}, got {p.steps}")
        if b.max_batch_size is not None and not 1 <= p.batch_size <= b.max_batch_size:
            raise KilnError(f"batch_size must be between 1 and {b.max_batch_size}, got {p.batch_size}")
        if b.max_n_iter is not None and not 1 <= p.n_iter <= b.max_n_iter:
            raise KilnError(f"n_iter must be between 1 and {b.max_n_iter}, got {p.n_iter}")
        for name in ("width", "height"):
            v = getattr(p, name)
            if v is not None and (v < env.size_unit or v % env.size_unit or b.max_size and v > b.max_size):
                raise KilnError(f"{name} must be a multiple of {env.size_unit} up to {b.max_size or 'any size'}, "
                                f"got {v}")
        if env.clip_layers is not None and not 1 <= p.clip_skip <= env.clip_layers:
            raise KilnError(f"clip skip must be between 1 and {env.clip_layers}, got {p.clip_skip}")
    if b.max_images is not None and images > b.max_images:
        raise KilnError(f"the script would render {images} images (its cells, tiles or lines); this server renders "
                        f"at most {b.max_images} per request")


# ---------------------------------------------------------------------------------------------- results
def add_fields(infotext: str, fields: dict) -> str:
    """An infotext with more `key: value` pairs on its parameters line (A1111's extra generation params)."""
    extra = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    return f"{infotext}, {extra}" if extra else infotext


def image_result(image: Image.Image, infotext: str, like: Result, seed: int | None = None,
                 prompt: str | None = None, flagged: bool = False) -> Result:
    """A Result holding one image a script made itself (a grid, an upscaled picture)."""
    image = image.convert("RGB")
    params = dict(like.params, width=image.width, height=image.height)
    return Result([image], [like.seeds[0] if seed is None else seed], [like.prompts[0] if prompt is None else prompt],
                  params, None, np.asarray(image)[None], [infotext], [flagged], list(like.notices))


def watermarked(image: Image.Image, params: GenerationParams, pipe) -> Image.Image:
    """A picture a script composed, with the invisible watermark the generation loop gives every image."""
    from ..pipeline.watermark import can_watermark, put_watermark

    text = params.watermark_text(pipe.cfg)
    pixels = np.asarray(image.convert("RGB"))
    if not text or not can_watermark(pixels):
        return image
    return Image.fromarray(put_watermark(pixels, text))


def with_params(p: GenerationParams, **changes) -> GenerationParams:
    return replace(p, **changes)
