"""Running a sampler of the registry over a noise predictor: txt2img, img2img (from a partly noised latent),
a kept region (inpainting) and a second model for the last steps (SDXL's refiner)."""
from __future__ import annotations

import math

from .compvis import Known, ddim_timesteps
from .schedules import COMPVIS_DISCRETIZE, get_sigmas


def discrete_denoiser(eps_fn, disc):
    """A denoiser D(x, σ) over a noise predictor trained on discrete steps: x_t = x/√(1+σ²), t = t(σ)."""
    def denoise(x, sigma):
        t = disc.sigma_to_t(sigma)
        return x - sigma * eps_fn(x / math.sqrt(1.0 + sigma * sigma), t)

    return denoise


def keeping(denoise, known_mask, init):
    """A denoiser whose estimate is `init` where `known_mask` is 1: every step moves that region exactly there."""
    return lambda z, sigma: known_mask * init + (1 - known_mask) * denoise(z, sigma)


def steps_run(spec, disc, schedule: str, steps: int, strength: float = 1.0) -> int:
    """How many steps `sample` runs for these arguments (its callbacks' total): DDIM/PLMS count CompVis'
    sub-steps (30 steps run 31), img2img only the last int(strength · n)."""
    n = len(ddim_timesteps(steps, len(disc.alphas_cumprod), COMPVIS_DISCRETIZE[schedule])) if spec.kind == "eps" \
        else steps
    return n if strength >= 1.0 else int(strength * n)


def _staged(cb, offset, steps):
    return None if cb is None else (lambda i, n, *a: cb(i + offset, steps, *a))


def sample(spec, eps_fn, x, *, disc, schedule, steps, eta, s_noise, noise, callback=None, init=None,
           strength=1.0, known_mask=None, refiner=None):
    """Run sampler `spec` from unit noise `x` (fp32) to a clean latent. `noise(like)` draws the noise a stochastic
    sampler injects (the images' own generators, so every image is reproducible on its own).

    img2img: `init` (clean latents) is noised to the level of the first of the last int(strength·steps) steps
    and only those run; strength 1 starts from pure noise, exactly as txt2img. `known_mask` (latent-sized,
    1 = keep `init`) keeps the init where it is 1: DDIM/PLMS blend the re-noised init in before every step
    (CompVis), the other samplers see a denoiser whose estimate is the init there; both return the init there.

    `refiner` = (ε of a second model, switch): this model runs the steps before `switch` of the whole schedule and
    the second one the rest, from the same noisy latent (SDXL's base + refiner). The switch sits at the same step
    (noise level) in img2img as in txt2img: an img2img run that starts past it is the refiner's alone."""
    split = None
    if refiner is not None:
        ref_eps, switch = refiner
        split = min(steps, max(0, round(switch * steps)))  # steps of the whole schedule run by this model
        if split == steps:
            refiner = None
    if spec.kind == "eps":
        return _sample_eps(spec, eps_fn, x, disc, schedule, steps, eta, noise, callback, init, strength,
                           known_mask, refiner and (ref_eps, split))
    sigmas = get_sigmas(disc, schedule, steps)
    denoise = discrete_denoiser(eps_fn, disc)
    skipped = 0  # steps of the schedule img2img leaves out
    if init is not None and strength < 1.0:
        t_enc = int(strength * steps)
        if t_enc == 0:
            return init
        skipped = steps - t_enc
        sigmas = sigmas[skipped:]
        x = init + x * float(sigmas[0])
    else:  # σ_max·ε in the VE frame; TCD: ε in the VP frame, its reference's start (0.2% larger at σ_max 14.6)
        x = x * (math.sqrt(1.0 + float(sigmas[0]) ** 2) if spec.vp_start else float(sigmas[0]))
    keep = (lambda d: keeping(d, known_mask, init)) if known_mask is not None else (lambda d: d)
    kw = dict(noise=noise, eta=eta, s_noise=s_noise, disc=disc)  # disc: for samplers that step on trained timesteps
    if refiner is None:
        return spec.fn(keep(denoise), x, sigmas, callback=callback, **kw)
    split, total = max(0, split - skipped), len(sigmas) - 1
    if split:
        x = spec.fn(keep(denoise), x, sigmas[:split + 1], callback=_staged(callback, 0, total), **kw)
    return spec.fn(keep(discrete_denoiser(ref_eps, disc)), x, sigmas[split:], callback=_staged(callback, split, total),
                   **kw)


def _sample_eps(spec, eps_fn, x, disc, schedule, steps, eta, noise, callback, init, strength, known_mask,
                refiner):
    """DDIM and PLMS on CompVis' discrete timesteps (`sample`'s arguments; `refiner` = (ε, split) or None)."""
    ac = disc.alphas_cumprod.float()
    known = Known(known_mask, init, ac.to(x.device), noise) if known_mask is not None else None
    discretize = COMPVIS_DISCRETIZE[schedule]
    ts = ddim_timesteps(steps, len(ac), discretize)
    start = None
    if init is not None and strength < 1.0:
        start = int(strength * len(ts))
        if start == 0:
            return init
        a = ac[int(ts[start - 1])].item()  # noised to the level of the first step that runs (CompVis
        x = a ** 0.5 * init + (1 - a) ** 0.5 * x  # noised one sub-step higher: an off-by-one kiln fixes)
    kw = dict(eta=eta, noise=noise, known=known, discretize=discretize)
    if refiner is None:
        return spec.fn(eps_fn, x, ac, steps, callback=callback, start=start, **kw)
    ref_eps, split = refiner
    first = len(ts) if start is None else start  # the sub-steps run, from first - 1 down to 0
    stop = min(len(ts) - split, first)  # the refiner runs sub-steps stop - 1 … 0
    base_steps = first - stop
    if base_steps:
        x = spec.fn(eps_fn, x, ac, steps, callback=_staged(callback, 0, first), start=start, stop=stop, **kw)
    return spec.fn(ref_eps, x, ac, steps, callback=_staged(callback, base_steps, first), start=stop, **kw)
