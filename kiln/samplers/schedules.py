"""Noise levels: the CompVis discrete schedule seen as sigmas, and the step schedules samplers walk along.

A latent at discrete step t is x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. Divided by √ᾱ_t it is x0 + σ_t·ε with
σ_t = √((1−ᾱ_t)/ᾱ_t): the "variance exploding" form that k-diffusion samplers work in. Between the 1000
trained steps, t and σ are interpolated linearly in log σ, as k-diffusion's `DiscreteSchedule` does.
"""
from __future__ import annotations

import math

import torch


class Discrete:
    """σ ↔ t conversions for a model trained on discrete steps with cumulative alphas `alphas_cumprod`."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.double().cpu()
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


SCHEDULES = {"normal": normal, "karras": karras, "exponential": exponential,
             "sgm_uniform": sgm_uniform, "simple": simple}

# DDIM and PLMS step on CompVis' trained timesteps (`compvis.ddim_timesteps`): "normal" is CompVis' uniform
# discretization (their default), "quad" CompVis' quadratic one. The k-diffusion samplers take SCHEDULES.
COMPVIS_DISCRETIZE = {"normal": "uniform", "quad": "quad"}

# A1111's "Schedule type" labels ("Quad" is kiln's, for CompVis' quad); "Automatic" means the sampler's default.
SCHEDULE_LABELS = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform", "simple": "Simple", "quad": "Quad"}
SCHEDULE_ALIASES = {"uniform": "normal", "automatic": None, "auto": None, "sgm uniform": "sgm_uniform",
                    "sgm-uniform": "sgm_uniform", "default": None}


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
                     "quad (DDIM and PLMS only)")


def get_sigmas(d: Discrete, name: str, n: int) -> torch.Tensor:
    """n noise levels from high to low, then 0: n sampler steps (float64 on the CPU)."""
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    return SCHEDULES[name](d, n)
