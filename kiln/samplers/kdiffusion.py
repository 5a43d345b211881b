"""The k-diffusion sampler family over a denoiser `denoise(x, sigma) -> x0 estimate`.

x lives in the variance-exploding form x0 + σ·ε and starts at σ_max·noise. `sigmas` runs from high to low and
ends with 0 (see `schedules.py`). Formulas follow Karras et al. (2022), Lu et al. (DPM-Solver++, 2022) and
Katherine Crowson's k-diffusion `sampling.py`, which the tests use as the reference.

Common arguments: `noise(x)` draws fresh standard noise shaped like x (the caller's per-image generators);
`callback(i, total, x, denoised)` runs after each step; `eta` scales the injected noise of ancestral/SDE
methods (0 makes them deterministic); `s_noise` scales the noise itself.
"""
from __future__ import annotations

import math

import torch


def _floats(sigmas) -> list[float]:
    return [float(s) for s in sigmas]


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to σ_down and fresh noise of size σ_up (σ_down² + σ_up² = σ_to²)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - up ** 2), up


def _need_noise(noise, eta):
    if eta and noise is None:
        raise ValueError("this sampler with eta > 0 needs a noise source")


def _d(x, sigma, denoised):
    """dx/dσ of the probability-flow ODE."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(denoise, x, sigmas, noise=None, callback=None, **_):
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        x = x + _d(x, s[i], denoised) * (s[i + 1] - s[i])
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_euler_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, **_):
    _need_noise(noise, eta)
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + _d(x, s[i], denoised) * (down - s[i])
        if s[i + 1] > 0 and up > 0:
            x = x + noise(x) * s_noise * up
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoise, x, sigmas, noise=None, callback=None, **_):
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        d = _d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:  # the trapezoid needs a slope at σ = 0, which does not exist: plain Euler
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = _d(x2, s[i + 1], denoise(x2, s[i + 1]))
            x = x + (d + d2) / 2 * dt
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


def _dpm2_step(denoise, x, d, sigma, sigma_to):
    """Midpoint in log σ, then the full step with the midpoint's slope (DPM-Solver-2-like)."""
    mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x2 = x + d * (mid - sigma)
    return x + _d(x2, mid, denoise(x2, mid)) * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm2(denoise, x, sigmas, noise=None, callback=None, **_):
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        d = _d(x, s[i], denoised)
        x = x + d * (s[i + 1] - s[i]) if s[i + 1] == 0 else _dpm2_step(denoise, x, d, s[i], s[i + 1])
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, **_):
    _need_noise(noise, eta)
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        d = _d(x, s[i], denoised)
        if down == 0:
            x = x + d * (down - s[i])
        else:
            x = _dpm2_step(denoise, x, d, s[i], down)
            if up > 0:
                x = x + noise(x) * s_noise * up
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


def lms_coefficient(order: int, s: list[float], i: int, j: int, nodes: int = 64) -> float:
    """∫ from σ_i to σ_{i+1} of the j-th Lagrange basis polynomial through σ_i, σ_{i-1}, …, σ_{i-order+1}.

    The integrand is a polynomial of degree < order, so Gauss–Legendre quadrature with `nodes` points is exact."""
    def basis(tau):
        p = 1.0
        for k in range(order):
            if k != j:
                p *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return p

    xs, ws = _gauss_legendre(nodes)
    a, b = s[i], s[i + 1]
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * basis(mid + half * t) for t, w in zip(xs, ws))


_GL_CACHE: dict[int, tuple[list[float], list[float]]] = {}


def _gauss_legendre(n: int):
    if n not in _GL_CACHE:
        import numpy as np

        xs, ws = np.polynomial.legendre.leggauss(n)
        _GL_CACHE[n] = (xs.tolist(), ws.tolist())
    return _GL_CACHE[n]


@torch.no_grad()
def sample_lms(denoise, x, sigmas, noise=None, callback=None, order: int = 4, **_):
    """Linear multistep in σ: the slope history fitted by a polynomial and integrated over the step."""
    s = _floats(sigmas)
    ds = []
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        ds.append(_d(x, s[i], denoised))
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, s, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


# DPM-Solver++ works in λ = −log σ (the half log-SNR); a data-prediction step from σ to σ' is
#   x' = (σ'/σ)·x − (e^{−h} − 1)·x̂0,  h = λ' − λ.
def _lam(sigma: float) -> float:
    return -math.log(sigma)


@torch.no_grad()
def sample_dpmpp_2s_a(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, **_):
    _need_noise(noise, eta)
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x + _d(x, s[i], denoised) * (down - s[i])
        else:  # single-step second order with the midpoint in λ
            h = _lam(down) - _lam(s[i])
            mid = math.exp(-(_lam(s[i]) + h / 2))
            x2 = (mid / s[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / s[i]) * x - math.expm1(-h) * denoise(x2, mid)
        if s[i + 1] > 0 and up > 0:
            x = x + noise(x) * s_noise * up
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5, **_):
    """DPM-Solver++ stochastic, two evaluations per step (the intermediate point at fraction r of the λ step)."""
    _need_noise(noise, eta)
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        if s[i + 1] == 0:
            x = x + _d(x, s[i], denoised) * (s[i + 1] - s[i])
        else:
            lam, lam_next = _lam(s[i]), _lam(s[i + 1])
            h = lam_next - lam
            s_mid = math.exp(-(lam + r * h))
            down, up = ancestral_step(s[i], s_mid, eta)
            x2 = (down / s[i]) * x - math.expm1(lam - _lam(down)) * denoised
            if up > 0:
                x2 = x2 + noise(x) * s_noise * up
            denoised2 = denoise(x2, s_mid)
            down, up = ancestral_step(s[i], s[i + 1], eta)
            fac = 1 / (2 * r)
            mixed = (1 - fac) * denoised + fac * denoised2
            x = (down / s[i]) * x - math.expm1(lam - _lam(down)) * mixed
            if up > 0:
                x = x + noise(x) * s_noise * up
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, noise=None, callback=None, **_):
    s = _floats(sigmas)
    old = None
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # the step to σ = 0 is exactly the data prediction
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            d = denoised
            if old is not None:
                r = (_lam(s[i]) - _lam(s[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old = denoised
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint", **_):
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    _need_noise(noise, eta)
    s = _floats(sigmas)
    old, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            eh = eta * h
            x = (s[i + 1] / s[i]) * math.exp(-eh) * x - math.expm1(-h - eh) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eh) / (-h - eh) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x - 0.5 * math.expm1(-h - eh) * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * eh)) * s_noise
        old, h_last = denoised, h
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoise, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, **_):
    _need_noise(noise, eta)
    s = _floats(sigmas)
    d1_, d2_, h1, h2 = None, None, None, None  # the two previous data predictions and step sizes
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            he = h * (eta + 1)
            x = math.exp(-he) * x - math.expm1(-he) * denoised
            phi2 = math.expm1(-he) / he + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                a = (denoised - d1_) / r0
                b = (d1_ - d2_) / r1
                first = a + (a - b) * r0 / (r0 + r1)
                second = (a - b) / (r0 + r1)
                phi3 = phi2 / he - 0.5
                x = x + phi2 * first - phi3 * second
            elif h1 is not None:
                x = x + phi2 * (denoised - d1_) / (h1 / h)
            if eta:
                x = x + noise(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d1_, d2_, h1, h2 = denoised, d1_, h, h1
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(denoise, x, sigmas, noise=None, callback=None, **_):
    """Latent Consistency Model sampling: jump to the data prediction, re-noise to the next level."""
    if noise is None and len(sigmas) > 2:
        raise ValueError("LCM sampling needs a noise source")
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        x = denoised
        if s[i + 1] > 0:
            x = x + s[i + 1] * noise(x)
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoise, x, sigmas, noise=None, callback=None, eta=1.0, **_):
    """Ancestral DDPM (Ho et al. 2020, eq. 11, posterior variance β̃) between the schedule's noise levels."""
    _need_noise(noise, eta)
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        a = 1 / (1 + s[i] ** 2)          # ᾱ at this level
        a_prev = 1 / (1 + s[i + 1] ** 2)  # ᾱ at the next (1 at σ = 0)
        alpha = a / a_prev
        eps = (x - denoised) / s[i]
        x_vp = x * math.sqrt(a)
        mean = (x_vp - (1 - alpha) / math.sqrt(1 - a) * eps) / math.sqrt(alpha)
        if s[i + 1] > 0:
            if eta:
                mean = mean + eta * math.sqrt((1 - alpha) * (1 - a_prev) / (1 - a)) * noise(x)
            x = mean / math.sqrt(a_prev)
        else:
            x = mean
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x


def _trained_step(disc, sigma: float) -> int:
    """The trained timestep whose σ this is (the TCD/LCM schedules sit on trained steps; σ → t rounds off)."""
    return int(round(disc.sigma_to_t(sigma)))


@torch.no_grad()
def sample_tcd(denoise, x, sigmas, noise=None, callback=None, eta=0.3, s_noise=1.0, disc=None, **_):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024; diffusers'
    TCDScheduler): from the prediction (x̂0, ε̂) go to the earlier trained step s = ⌊(1 − γ)·t'⌋ of the next one t'
    deterministically, x_s = x̂0 + σ_s·ε̂, then forward to t' with fresh noise of size √(σ'² − σ_s²). `eta` is γ:
    0 is deterministic, 1 the LCM sampler. The last step lands, as TCD's does, on trained step 0 (x̂0 + σ_0·ε̂
    scaled by √ᾱ_0, like CompVis' DDIM), not exactly on σ = 0."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's gamma (eta) must be between 0 and 1, got {eta}")
    if disc is None:
        raise ValueError("TCD steps on trained timesteps: it needs the model's discrete schedule (disc)")
    s = _floats(sigmas)
    _need_noise(noise, eta if len(s) > 2 else 0)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        eps = (x - denoised) / s[i]
        t_next = _trained_step(disc, s[i + 1]) if s[i + 1] > 0 else 0
        sigma_s = float(disc.sigmas[math.floor((1 - eta) * t_next)])
        x = denoised + sigma_s * eps
        if s[i + 1] == 0:
            x = x / math.sqrt(1 + sigma_s ** 2)  # the VP latent at step 0, which TCD returns as the image
        elif eta > 0:
            x = x + noise(x) * s_noise * math.sqrt(max(s[i + 1] ** 2 - sigma_s ** 2, 0.0))
        if callback:
            callback(i, len(s) - 1, x, denoised)
    return x
