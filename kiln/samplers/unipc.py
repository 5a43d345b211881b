"""UniPC (Zhao et al., 2023): a multistep predictor with a corrector that reuses the next model evaluation.

Data-prediction form in the variance-exploding frame (x = x0 + σ·ε, λ = −log σ), so that one step from σ_s to σ_t is
    x_t = (σ_t/σ_s)·x_s − (e^{−h} − 1)·m0 − B(h)·Σ ρ_k·D_k,     h = λ_t − λ_s,
with D_k the scaled differences of earlier data predictions and ρ from the order conditions. B(h) = −h ("bh1",
the paper's choice for few steps) or e^{−h} − 1 ("bh2"). As in diffusers' UniPCMultistepScheduler (the test's
reference, predict_x0=True, lower_order_final=True): the order ramps up over the first steps and down over the
last, and the corrector runs on every step but the first.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _coefficients(h: float, rks: list[float], order: int, variant: str):
    """R (order × order Vandermonde in r_k) and b from the φ-function expansion."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    r = np.array(rks + [1.0])
    R, b, fact = [], [], 1
    for i in range(1, order + 1):
        R.append(r ** (i - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return np.array(R), np.array(b), h_phi_1, B_h


def _differences(outputs, sigmas_hist, sigma_s0, h, order):
    """r_k and D_k = (m_k − m0)/r_k for the k = 1 … order−1 previous outputs (newest first after m0)."""
    lam0 = -math.log(sigma_s0)
    rks, ds = [], []
    for k in range(1, order):
        rk = (-math.log(sigmas_hist[-(k + 1)]) - lam0) / h
        rks.append(rk)
        ds.append((outputs[-(k + 1)] - outputs[-1]) / rk)
    return rks, ds


def _predict(x, outputs, sigmas_hist, sigma_t, order, variant):
    sigma_s0, m0 = sigmas_hist[-1], outputs[-1]
    if sigma_t == 0:  # λ = ∞: the exact limit of the first-order step is the data prediction itself
        return m0
    h = math.log(sigma_s0) - math.log(sigma_t)
    rks, ds = _differences(outputs, sigmas_hist, sigma_s0, h, order)
    R, b, h_phi_1, B_h = _coefficients(h, rks, order, variant)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if ds:
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_t = x_t - B_h * sum(float(r) * d for r, d in zip(rhos, ds))
    return x_t


def _correct(x_last, m_t, outputs, sigmas_hist, sigma_t, order, variant):
    """Re-take the last step from x_last (at σ_s0) to σ_t, now also using the model output m_t at σ_t."""
    sigma_s0, m0 = sigmas_hist[-1], outputs[-1]
    h = math.log(sigma_s0) - math.log(sigma_t)
    rks, ds = _differences(outputs, sigmas_hist, sigma_s0, h, order)
    R, b, h_phi_1, B_h = _coefficients(h, rks, order, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    x_t = (sigma_t / sigma_s0) * x_last - h_phi_1 * m0
    res = sum(float(r) * d for r, d in zip(rhos[:-1], ds)) if ds else 0
    return x_t - B_h * (res + float(rhos[-1]) * (m_t - m0))


@torch.no_grad()
def sample_unipc(denoise, x, sigmas, noise=None, callback=None, order: int = 2, variant: str = "bh2", **_):
    """Defaults as diffusers' UniPCMultistepScheduler: order 2 (recommended there for guided sampling) and bh2.
    (Order 3 with bh1, as A1111/ComfyUI use it, overshoots on the demo model at 20 steps and scale 5.)"""
    if variant not in ("bh1", "bh2"):
        raise ValueError("UniPC variant must be 'bh1' or 'bh2'")
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    outputs, hist = [], []
    x_last, last_order, warm = None, 1, 0
    for i in range(n):
        denoised = denoise(x, s[i])
        if x_last is not None:
            x = _correct(x_last, denoised, outputs, hist, s[i], last_order, variant)
        outputs, hist = (outputs + [denoised])[-order:], (hist + [s[i]])[-order:]
        this_order = min(order, n - i, warm + 1)
        x_last = x
        x = _predict(x, outputs, hist, s[i + 1], this_order, variant)
        warm = min(warm + 1, order)
        last_order = this_order
        if callback:
            callback(i, n, x, denoised)
    return x
