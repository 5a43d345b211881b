"""Noise levels: the CompVis discrete schedule seen as sigmas, and the step schedules samplers walk along.

A latent at discrete step t is x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. Divided by √ᾱ_t it is x0 + σ_t·ε with
σ_t = √((1−ᾱ_t)/ᾱ_t): the "variance exploding" form that k-diffusion samplers work in. Between the 1000
trained steps, t and σ are interpolated linearly in log σ, as k-diffusion's `DiscreteSchedule` does.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class Discrete:
    """σ ↔ t conversions for a model trained on discrete steps with cumulative alphas `alphas_cumprod`.
    `sdxl` picks the SDXL list of Align Your Steps (SD 1.x and SDXL share the same ᾱ, but not the optimised steps)."""

    def __init__(self, alphas_cumprod: torch.Tensor, sdxl: bool = False):
        ac = alphas_cumprod.double().cpu()
        self.sdxl = sdxl
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        log_sigma = math.log(sigma)
        ls = self.log_sigmas
        if log_sigma <= ls[0]:
            return 0.0
        if log_sigma >= ls[-1]:
            return float(len(ls) - 1)
        low = int(torch.searchsorted(ls, torch.tensor(log_sigma, dtype=ls.dtype))) - 1
        w = (log_sigma - float(ls[low])) / float(ls[low + 1] - ls[low])
        return low + w

    def t_to_sigma(self, t: float) -> float:
        low = min(int(math.floor(t)), len(self.sigmas) - 1)
        high = min(low + 1, len(self.sigmas) - 1)
        w = t - low
        return math.exp((1 - w) * float(self.log_sigmas[low]) + w * float(self.log_sigmas[high]))

    def alpha_cumprod_at(self, t: float) -> float:
        """ᾱ at a (possibly fractional) step; exactly the table value at integer steps."""
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        return 1.0 / (1.0 + self.t_to_sigma(t) ** 2)


def _append_zero(sigmas) -> torch.Tensor:
    return torch.cat([torch.as_tensor(sigmas, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def normal(d: Discrete, n: int) -> torch.Tensor:
    """Evenly spaced in t from the last trained step to the first (k-diffusion `get_sigmas`, A1111 "Uniform")."""
    t = torch.linspace(len(d.sigmas) - 1, 0, n, dtype=torch.float64)
    return _append_zero([d.t_to_sigma(float(x)) for x in t])


def karras(d: Discrete, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: evenly spaced in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = d.sigma_min ** (1 / rho), d.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(d: Discrete, n: int) -> torch.Tensor:
    """Evenly spaced in log σ."""
    return _append_zero(torch.linspace(math.log(d.sigma_max), math.log(d.sigma_min), n, dtype=torch.float64).exp())


def sgm_uniform(d: Discrete, n: int) -> torch.Tensor:
    """Evenly spaced in t over n+1 points, the last (t = 0) dropped: the SGM/SDXL-Turbo/LCM convention."""
    t = torch.linspace(len(d.sigmas) - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero([d.t_to_sigma(float(x)) for x in t])


def simple(d: Discrete, n: int) -> torch.Tensor:
    """Every (1000/n)-th trained σ counted down from the top (ComfyUI "simple")."""
    stride = len(d.sigmas) / n
    return _append_zero([float(d.sigmas[-(1 + int(i * stride))]) for i in range(n)])


# Align Your Steps (Sabour et al. 2024): the 10-step noise levels NVIDIA published for SD 1.5 and SDXL
# (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), as A1111 and ComfyUI carry them.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def align_your_steps(d: Discrete, n: int) -> torch.Tensor:
    """The published list for the model's family, resampled to n levels by linear interpolation of log σ over
    evenly spaced positions (A1111's "Align Your Steps": n levels then 0; n = 11 is the list itself)."""
    levels = torch.tensor(AYS_SDXL if d.sdxl else AYS_SD15, dtype=torch.float64)
    if n == len(levels):
        return _append_zero(levels)
    pos = torch.linspace(0, 1, n, dtype=torch.float64) * (len(levels) - 1)
    low = pos.floor().long().clamp(max=len(levels) - 2)
    w = pos - low
    logs = levels.log()
    between = ((1 - w) * logs[low] + w * logs[low + 1]).exp()
    return _append_zero(torch.where(w == 0, levels[low], between))  # published levels exactly, not exp(log(σ))


def spaced_timesteps(spacing: str, n: int, num_train: int = 1000) -> np.ndarray:
    """n timesteps from high to low as diffusers' `timestep_spacing` places them (SD's scheduler config,
    steps_offset 1): "leading" every (N // n)-th step from 1 up (the DDIM default; never reaches the top),
    "trailing" every (N / n)-th step counted down from N − 1 (what Turbo, Lightning and Hyper-SD need: the first
    step at full noise), "linspace" n evenly spaced (fractional) steps from N − 1 to 0."""
    if spacing == "leading":
        return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.float64) + 1
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / n).round().astype(np.float64) - 1
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n, dtype=np.float64)[::-1].copy()
    raise ValueError(f"unknown timestep spacing {spacing!r}: leading, trailing or linspace")


def _spaced(spacing: str):
    def schedule(d: Discrete, n: int) -> torch.Tensor:
        """σ at diffusers' spaced timesteps, linear in σ between trained steps (EulerDiscreteScheduler)."""
        ts = spaced_timesteps(spacing, n, len(d.sigmas))
        return _append_zero(np.interp(ts, np.arange(len(d.sigmas)), d.sigmas.numpy()))
    return schedule


LCM_ORIGINAL_STEPS = 50


def lcm(d: Discrete, n: int) -> torch.Tensor:
    """diffusers' LCM and TCD timesteps: the distillation grid of 50 steps (every 20th, from 999 down to 19), n of
    them evenly by index (4 steps: 999, 759, 499, 259)."""
    if n > LCM_ORIGINAL_STEPS:
        raise ValueError(f"the lcm schedule has at most {LCM_ORIGINAL_STEPS} steps, got {n}")
    k = len(d.sigmas) // LCM_ORIGINAL_STEPS
    grid = np.arange(1, LCM_ORIGINAL_STEPS + 1)[::-1] * k - 1
    picked = grid[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, n, endpoint=False)).astype(np.int64)]
    return _append_zero(d.sigmas[torch.from_numpy(picked.copy())])


SCHEDULES = {"normal": normal, "karras": karras, "exponential": exponential,
             "sgm_uniform": sgm_uniform, "simple": simple, "align_your_steps": align_your_steps,
             "leading": _spaced("leading"), "trailing": _spaced("trailing"), "linspace": _spaced("linspace"),
             "lcm": lcm}
MAX_STEPS = {"lcm": LCM_ORIGINAL_STEPS}

# DDIM and PLMS step on trained timesteps (`compvis.ddim_timesteps`): "normal" is CompVis' uniform
# discretization (their default), "quad" CompVis' quadratic one, leading/trailing/linspace diffusers' spacings.
# The k-diffusion samplers take SCHEDULES.
COMPVIS_DISCRETIZE = {"normal": "uniform", "quad": "quad", "leading": "leading", "trailing": "trailing",
                      "linspace": "linspace"}

# A1111's "Schedule type" labels ("Quad" is kiln's, for CompVis' quad; A1111 has no spacings); "Automatic" means
# the sampler's default.
SCHEDULE_LABELS = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "align_your_steps": "Align Your Steps",
                   "leading": "Leading", "trailing": "Trailing", "linspace": "Linspace", "lcm": "LCM",
                   "quad": "Quad"}
SCHEDULE_ALIASES = {"uniform": "normal", "automatic": None, "auto": None, "sgm uniform": "sgm_uniform",
                    "sgm-uniform": "sgm_uniform", "default": None, "align your steps": "align_your_steps",
                    "align-your-steps": "align_your_steps", "ays": "align_your_steps"}


def resolve_schedule(name: str | None) -> str | None:
    """Our name for a schedule given in our spelling or A1111's; None means "the sampler's default"."""
    if name is None or name == "":
        return None
    key = name.strip().lower()
    if key in SCHEDULES or key in COMPVIS_DISCRETIZE:
        return key
    if key in SCHEDULE_ALIASES:
        return SCHEDULE_ALIASES[key]
    raise ValueError(f"unknown schedule {name!r}; choose one of: automatic, {', '.join(SCHEDULES)}, "
                     "quad (DDIM and PLMS take normal, quad, leading, trailing and linspace)")


def get_sigmas(d: Discrete, name: str, n: int) -> torch.Tensor:
    """n noise levels from high to low, then 0: n sampler steps (float64 on the CPU)."""
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    return SCHEDULES[name](d, n)
