"""DDIM and PLMS against the CompVis formulas and diffusers' DDIMScheduler, on small analytic denoisers."""
import numpy as np
import pytest
import torch

from kiln.models import ModelConfig, alphas_cumprod
from kiln.samplers import ddim_schedule, ddim_timesteps, sample_ddim, sample_plms

AC = alphas_cumprod(ModelConfig())


def toy_eps(x, t):
    """A smooth, nonlinear, t-dependent noise predictor (samplers only see this function)."""
    s = torch.tensor(t / 1000.0)
    return torch.tanh(0.8 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + s) + 0.1 * torch.sin(3 * s)


def test_schedule_matches_compvis_values():
    assert AC[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert AC[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    sig = ((1 - AC) / AC) ** 0.5
    assert sig[0].item() == pytest.approx(0.0291675, rel=1e-4) and sig[-1].item() == pytest.approx(14.614642, rel=1e-5)


@pytest.mark.parametrize("steps,n,first,last", [(50, 50, 1, 981), (10, 10, 1, 901), (15, 16, 1, 991), (30, 31, 1, 991),
                                                (3, 4, 1, 999), (1000, 999, 1, 999)])
def test_ddim_timesteps_uniform(steps, n, first, last):
    ts = ddim_timesteps(steps)
    assert len(ts) == n and ts[0] == first and ts[-1] == last
    assert np.all(np.diff(ts)[:-1] == 1000 // steps) and 1 <= np.diff(ts)[-1] <= 1000 // steps


def test_ddim_timesteps_quad_are_compvis_values():
    """CompVis' `make_ddim_timesteps("quad", n, 1000)`: (linspace(0, √800, n)²).astype(int) + 1, repeats kept."""
    assert ddim_timesteps(20, discretize="quad").tolist() == [1, 3, 9, 20, 36, 56, 80, 109, 142, 180, 222, 269, 320,
                                                             375, 435, 499, 568, 641, 719, 801]
    ts = ddim_timesteps(50, discretize="quad")
    assert len(ts) == 50 and ts[:6].tolist() == [1, 1, 2, 3, 6, 9] and ts[-1] == 801
    with pytest.raises(ValueError, match="uniform.*quad"):
        ddim_timesteps(20, discretize="karras")


def test_ddim_quad_steps_on_the_quad_timesteps():
    ts = ddim_timesteps(20, discretize="quad")
    calls, x = [], torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = sample_ddim(lambda z, t: (calls.append(t), toy_eps(z, t))[1], x.clone(), AC, 20, discretize="quad")
    assert calls == ts[::-1].tolist()
    prev = [0] + ts[:-1].tolist()  # ᾱ_prev of the first timestep is ᾱ[0]
    for t, tp in zip(ts[::-1].tolist(), prev[::-1]):
        e = toy_eps(x, t)
        x = AC[tp].sqrt() * (x - (1 - AC[t]).sqrt() * e) / AC[t].sqrt() + (1 - AC[tp]).sqrt() * e
    assert (out - x).abs().max() <= 1e-5


def test_ddim_first_alpha_prev_is_alpha0_and_eta_sigma():
    ts, a, a_prev, sigma = ddim_schedule(AC, 10, eta=0.0)
    assert a_prev[0] == AC[0] and torch.equal(a_prev[1:], AC[ts[:-1]])
    assert torch.all(sigma == 0)
    _, a, a_prev, sigma = ddim_schedule(AC, 10, eta=1.0)
    expected = ((1 - a_prev.double()) / (1 - a.double()) * (1 - a.double() / a_prev.double())).sqrt()
    assert torch.allclose(sigma.double(), expected, rtol=1e-6)


def test_ddim_matches_diffusers_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(20)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, int(t)), t, x, eta=0.0).prev_sample
    ours = sample_ddim(toy_eps, x0.clone(), AC, 20)
    assert (ours - x).abs().max() <= 1e-4


def compvis_plms_reference(eps_fn, x, steps, discretize="uniform"):
    """A line-by-line transcription of CompVis' `PLMSSampler.plms_sampling` / `p_sample_plms` (eta = 0)."""
    ts = ddim_timesteps(steps, discretize=discretize)
    alphas = AC[ts]
    alphas_prev = torch.cat([AC[:1], AC[ts[:-1]]])
    time_range = np.flip(ts)
    total = len(ts)
    old_eps, calls = [], []

    def model(x, t):
        calls.append(t)
        return eps_fn(x, t)

    def x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    for i, step in enumerate(time_range):
        index = total - i - 1
        ts_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = model(x, int(step))
        if len(old_eps) == 0:
            x_prev, _ = x_prev_and_pred_x0(x, e_t, index)
            e_t_next = model(x_prev, int(ts_next))
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x, calls


@pytest.mark.parametrize("steps,discretize", [(1, "uniform"), (2, "uniform"), (3, "uniform"), (5, "uniform"),
                                              (20, "uniform"), (50, "uniform"), (20, "quad"), (50, "quad")])
def test_plms_matches_compvis_transcription(steps, discretize):
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref, ref_calls = compvis_plms_reference(toy_eps, x0.clone(), steps, discretize)
    calls = []
    ours = sample_plms(lambda x, t: (calls.append(t), toy_eps(x, t))[1], x0.clone(), AC, steps,
                       discretize=discretize)
    # the first step evaluates twice
    assert calls == ref_calls and len(calls) == len(ddim_timesteps(steps, discretize=discretize)) + 1
    assert (ours - ref).abs().max() <= 1e-6


def test_plms_first_step_is_pseudo_improved_euler():
    """With one step PLMS equals a DDIM step taken with the mean of ε at t and at the predicted next point."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ts, a, a_prev, _ = ddim_schedule(AC, 1)
    e1 = toy_eps(x0, int(ts[0]))
    pred = (x0 - (1 - a[0]).sqrt() * e1) / a[0].sqrt()
    x1 = a_prev[0].sqrt() * pred + (1 - a_prev[0]).sqrt() * e1
    e = (e1 + toy_eps(x1, int(ts[0]))) / 2
    expect = a_prev[0].sqrt() * (x0 - (1 - a[0]).sqrt() * e) / a[0].sqrt() + (1 - a_prev[0]).sqrt() * e
    assert torch.allclose(sample_plms(toy_eps, x0, AC, 1), expect, atol=1e-6)


def gaussian_eps(mu, s):
    """The exact noise predictor for data x0 ~ N(mu, s²): E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ·mu) / (ᾱs² + 1 − ᾱ)."""
    def eps(x, t):
        a = AC[t]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps


def test_ddim_and_plms_agree_at_50_steps():
    gen = torch.Generator().manual_seed(1)
    mu, x0 = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    eps = gaussian_eps(mu, 0.5)
    d = sample_ddim(eps, x0.clone(), AC, 50)
    p = sample_plms(eps, x0.clone(), AC, 50)
    fine = sample_ddim(eps, x0.clone(), AC, 1000)
    err_d, err_p = (d - fine).abs().max().item(), (p - fine).abs().max().item()
    # measured: DDIM max error 0.074, PLMS 0.013 (latent values of unit scale)
    assert (d - p).abs().max() < 0.1 and err_d < 0.1 and err_p < 0.03, (err_d, err_p)
    assert err_p <= err_d  # the higher-order method is closer to the fine solution


def test_ddim_eta_uses_the_noise_source():
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    draws = []

    def noise(like):
        draws.append(1)
        return torch.ones_like(like)

    a = sample_ddim(toy_eps, x0.clone(), AC, 10, eta=1.0, noise=noise)
    b = sample_ddim(toy_eps, x0.clone(), AC, 10, eta=0.0, noise=noise)
    assert len(draws) == 10  # one draw per step: even the last step (ᾱ[1] → ᾱ[0]) has σ > 0
    assert not torch.allclose(a, b)


def test_plms_refuses_eta():
    with pytest.raises(ValueError):
        sample_plms(toy_eps, torch.zeros(1, 4, 8, 8), AC, 10, eta=0.5)
