"""DDIM and PLMS exactly as CompVis' `ldm/models/diffusion/{ddim,plms}.py`, over a noise predictor.

`eps_fn(x, t)` returns the (guided) noise prediction at integer timestep `t`; samplers know nothing else
about the model. `noise(x)` draws fresh noise shaped like `x` (per-image generators live in the caller).
`callback(i, total, x, pred_x0)` runs after every step.
"""
import numpy as np
import torch
import torch.nn.functional as F

from .schedules import spaced_timesteps


def ddim_timesteps(steps: int, num_train: int = 1000, discretize: str = "uniform") -> np.ndarray:
    """CompVis' `make_ddim_timesteps`, ascending.

    "uniform" (CompVis' default): every c-th step (c = num_train // steps), shifted by one; more than `steps` when c
    does not divide. Where the shift would reach index `num_train` (CompVis crashes there, e.g. for 3 or 1000 steps)
    the last timestep is clamped to `num_train - 1` and duplicates dropped.
    "quad": squares of `steps` evenly spaced values from 0 to √(0.8·num_train), shifted by one: denser at low noise,
    the first step at t = 0.8·num_train + 1. Beyond about 29 steps of 1000 low timesteps repeat, as in CompVis
    (a repeated step is a zero-length DDIM step, and PLMS keeps it in its history); kept, for CompVis' numbers.
    "leading", "trailing", "linspace": diffusers' `timestep_spacing` (`schedules.spaced_timesteps`), exactly `steps`
    of them, rounded to trained steps. Each step goes to the next timestep of the list (diffusers' DDIM steps back
    N // steps instead: the same where steps divides N, as it does for the 1, 2, 4 and 8 steps of distilled models)."""
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be between 1 and {num_train}, got {steps}")
    if discretize in ("leading", "trailing", "linspace"):
        return spaced_timesteps(discretize, steps, num_train).round().astype(int)[::-1].copy()
    if discretize == "quad":
        return (np.linspace(0, np.sqrt(num_train * 0.8), steps) ** 2).astype(int) + 1
    if discretize != "uniform":
        raise ValueError(f"unknown discretization {discretize!r}: 'uniform', 'quad', 'leading', 'trailing' or "
                         "'linspace'")
    c = num_train // steps
    return np.unique(np.minimum(np.arange(0, num_train, c) + 1, num_train - 1))


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0, discretize: str = "uniform"):
    """(timesteps, ᾱ_t, ᾱ_prev, σ_t) for the DDIM sub-schedule; the first ᾱ_prev is ᾱ[0], not 1."""
    ts = ddim_timesteps(steps, len(alphas_cumprod), discretize)
    ac = alphas_cumprod.double().cpu()
    a = ac[ts]
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return ts, a.float(), a_prev.float(), sigma.float()


def ddim_step(x, e_t, a_t, a_prev, sigma_t, noise=None, temperature=1.0, noise_dropout=0.0):
    """One DDIM update from the noise prediction; returns (x_prev, pred_x0). `temperature` scales the fresh noise,
    `noise_dropout` zeroes a fraction of it (rescaling the rest, as torch's dropout), both as CompVis."""
    pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
    dir_xt = (1 - a_prev - sigma_t ** 2).sqrt() * e_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if sigma_t > 0 and temperature != 0:
        n = sigma_t * noise(x) * temperature
        if noise_dropout > 0:
            n = F.dropout(n, p=noise_dropout)
        x_prev = x_prev + n
    return x_prev, pred_x0


class Known:
    """CompVis' `mask`/`x0` blending: before every step the latent takes `q_sample(x0, t)` where mask is 1; after
    the last step it takes x0 itself there (CompVis stops one re-noised step short; kiln returns the known region
    exactly). `noise(x)` supplies the re-noising noise."""

    def __init__(self, mask, x0, alphas_cumprod, noise):
        self.mask, self.x0, self.ac, self.noise = mask, x0, alphas_cumprod, noise

    def before(self, x, t):
        a = self.ac[t].to(x.dtype)
        return (a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise(x)) * self.mask + (1 - self.mask) * x

    def after(self, x):
        return self.x0 * self.mask + (1 - self.mask) * x


class Intermediates(dict):
    """CompVis' `log_every_t` record: {'x_inter': [...], 'pred_x0': [...]}, starting with the start latent."""

    def __init__(self, x, every, total):
        super().__init__(x_inter=[x], pred_x0=[x])
        self.every, self.total = every, total

    def log(self, index, x, pred_x0):
        if index % self.every == 0 or index == self.total - 1:
            self["x_inter"].append(x)
            self["pred_x0"].append(pred_x0)


@torch.no_grad()
def sample_ddim(eps_fn, x, alphas_cumprod, steps, eta=0.0, noise=None, callback=None, start=None,
                temperature=1.0, noise_dropout=0.0, known: Known | None = None,
                intermediates: Intermediates | None = None, stop: int = 0, discretize: str = "uniform"):
    """Run DDIM from pure noise `x` (or, with `start` = k, from a latent noised to the k-th sub-step: img2img).
    `stop` = k ends after sub-step k, leaving the latent at that sub-step's noise level (a refiner goes on from
    there with `start` = k). `discretize`: CompVis' "uniform" or "quad" timesteps (`ddim_timesteps`)."""
    ts, a, a_prev, sigma = ddim_schedule(alphas_cumprod, steps, eta, discretize)
    if eta > 0 and noise is None:
        raise ValueError("eta > 0 needs a noise source")
    n = len(ts) if start is None else start
    order = list(reversed(range(stop, n)))
    for i, index in enumerate(order):
        if known is not None:
            x = known.before(x, int(ts[index]))
        e_t = eps_fn(x, int(ts[index]))
        x, pred_x0 = ddim_step(x, e_t, a[index], a_prev[index], sigma[index], noise, temperature, noise_dropout)
        if callback:
            callback(i, len(order), x, pred_x0)
        if intermediates is not None:
            intermediates.log(index, x, pred_x0)
    return known.after(x) if known is not None else x


def plms_eps(e_t, old_eps):
    """Adams–Bashforth combination of the current and stored noise predictions (CompVis `p_sample_plms`)."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


@torch.no_grad()
def sample_plms(eps_fn, x, alphas_cumprod, steps, eta=0.0, noise=None, callback=None, start=None,
                temperature=1.0, noise_dropout=0.0, known: Known | None = None,
                intermediates: Intermediates | None = None, stop: int = 0, discretize: str = "uniform"):
    """PLMS: a pseudo improved-Euler first step (two evaluations), then 2-, 3-, 4-step Adams–Bashforth.
    (σ is 0 throughout, so temperature and noise dropout have nothing to act on; accepted as CompVis does.)"""
    if eta != 0:
        raise ValueError("PLMS is deterministic: eta must be 0")
    ts, a, a_prev, sigma = ddim_schedule(alphas_cumprod, steps, 0.0, discretize)
    n = len(ts) if start is None else start
    order = list(reversed(range(stop, n)))
    old_eps = []
    for i, index in enumerate(order):
        if known is not None:
            x = known.before(x, int(ts[index]))
        e_t = eps_fn(x, int(ts[index]))
        if not old_eps:
            x_next, _ = ddim_step(x, e_t, a[index], a_prev[index], sigma[index])
            t_next = int(ts[order[min(i + 1, len(order) - 1)]])
            e_prime = (e_t + eps_fn(x_next, t_next)) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        x, pred_x0 = ddim_step(x, e_prime, a[index], a_prev[index], sigma[index])
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback:
            callback(i, len(order), x, pred_x0)
        if intermediates is not None:
            intermediates.log(index, x, pred_x0)
    return known.after(x) if known is not None else x
