"""Per-step conditioning for one batch: A1111's prompt editing (`[from:to:when]`), alternation (`[a|b]`) and
composable diffusion (`a AND b :0.5`), for the denoiser's `guided`.

Every distinct text of a batch (each sub-prompt at each point of its schedule, each negative prompt) is encoded
once. At each step the denoiser gets one batched conditioning — the images' negative prompts, then every
sub-prompt of every image — and `Mix.combine` turns the model's outputs into one prediction per image:
    ε_i = u_i + scale · Σ_k w_ik (c_ik − u_i)      (A1111's combine_denoised)
which is plain classifier-free guidance for a prompt without AND. Steps are the sampler's (from 0 for the first
step that runs, as A1111 counts them); a `Clock` the step callback advances tells which step is running.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..prompts import schedule, split_and, text_at_step
from .text import Cond, conditioning


@dataclass
class Clock:
    step: int = 0  # the sampler step about to run, from 0
    total: int = 1  # the steps this pass runs

    def ticking(self, on_step):
        """`on_step` (a sampler callback), advancing the clock after every step."""
        def tick(i, total, x, pred_x0):
            self.step, self.total = i + 1, total
            if on_step is not None:
                on_step(i, total, x, pred_x0)
        return tick


@dataclass
class Mix:
    """One step's model call and how its output rows combine into one ε per image: row r of `cond` denoises
    image `sources[r]`; `uncond[i]` is image i's negative-prompt row (None: no guidance), `parts[i]` its
    sub-prompts' (row, weight)."""
    cond: Cond
    sources: torch.Tensor
    uncond: list[int] | None
    parts: list[list[tuple[int, float]]]
    plain: bool = field(init=False)  # one weight-1 part per image, in image order after the negatives

    def __post_init__(self):
        first = 0 if self.uncond is None else len(self.parts)
        marks = torch.ones(len(self.sources))
        marks[:first] = 0
        self.cond = Cond(self.cond.context, self.cond.vector, self.sources, marks)
        self.plain = all(ps == [(first + i, 1.0)] for i, ps in enumerate(self.parts))

    def combine(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        if self.uncond is None:
            return out if self.plain else out[[ps[0][0] for ps in self.parts]]
        n = len(self.parts)
        u = out[:n]
        if self.plain:
            return u + scale * (out[n:] - u)
        deltas = []
        for i, ps in enumerate(self.parts):
            d = None
            for row, w in ps:
                term = (out[row] - u[i]) * w
                d = term if d is None else d + term
            deltas.append(d)
        return u + scale * torch.stack(deltas)


def fixed_mix(cond: Cond, uncond: Cond | None) -> Mix:
    """The mix of one conditioning per image, with or without its negative (the same at every step)."""
    images = range(cond.context.shape[0])
    return _mix(cond, uncond, None if uncond is None else tuple(images), tuple(((i, 1.0),) for i in images))


def prompt_conds(pipe, prompts: list[str], negative: str | list[str], steps: int, *, guidance: bool,
                 clip_skip: int = 1, size=None, aesthetic=(6.0, 2.5), used: dict | None = None,
                 clock: Clock | None = None, hires_steps: int | None = None):
    """`conds(t)` → the `Mix` of the step `clock` shows, for a batch's prompts (LoRA tags already taken out) and
    negative prompts, over a pass of `steps` steps (the hires-fix pass after one: `hires_steps`). The negative
    prompts run with `guidance` (a CFG scale other than 1) and whenever a prompt has AND or a weight, since
    composable diffusion is defined against them."""
    clock = clock or Clock()
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    parts = [split_and(p) for p in prompts]
    with_uncond = guidance or any(len(ps) > 1 or ps[0][1] != 1.0 for ps in parts)
    sched = lambda text: schedule(text, steps, hires_steps)
    pos = [[(sched(text), w) for text, w in ps] for ps in parts]
    neg = [sched(text) for text in negatives] if with_uncond else None
    pos_texts = list(dict.fromkeys(t for ps in pos for s, _ in ps for _, t in s))
    neg_texts = None if neg is None else list(dict.fromkeys(t for s in neg for _, t in s))
    cond, uncond = conditioning(pipe, pos_texts, neg_texts, clip_skip, size=size, aesthetic=aesthetic, used=used)
    pos_index = {t: k for k, t in enumerate(pos_texts)}
    neg_index = None if neg is None else {t: k for k, t in enumerate(neg_texts)}
    cache = {}

    def at(step):
        """(negative text rows, [[(prompt text row, weight)]]) at `step`."""
        pick = lambda s: s[text_at_step(s, step)][1]
        negs = None if neg is None else tuple(neg_index[pick(s)] for s in neg)
        return negs, tuple(tuple((pos_index[pick(s)], w) for s, w in ps) for ps in pos)

    def conds(t):
        key = at(clock.step)
        if key not in cache:
            cache[key] = _mix(cond, uncond, *key)
        return cache[key]

    return conds


def _mix(cond: Cond, uncond: Cond | None, negs, parts) -> Mix:
    rows = [k for ps in parts for k, _ in ps]
    sources = [i for i, ps in enumerate(parts) for _ in ps]
    pick = lambda c, idx: Cond(c.context[idx], None if c.vector is None else c.vector[idx])
    p = pick(cond, rows)
    first = 0
    if negs is not None:
        u = pick(uncond, list(negs))
        p = Cond(torch.cat([u.context, p.context]), None if p.vector is None else torch.cat([u.vector, p.vector]))
        sources = list(range(len(parts))) + sources
        first = len(parts)
    at, out = first, []
    for ps in parts:
        out.append([(at + j, w) for j, (_, w) in enumerate(ps)])
        at += len(ps)
    return Mix(p, torch.tensor(sources), None if negs is None else list(range(len(parts))), out)
