"""Samplers and schedules of few-step (distilled) models against diffusers' schedulers, on an analytic noise
predictor: TCD (TCDScheduler, with γ), timestep spacings leading/trailing/linspace (EulerDiscreteScheduler,
DDIMScheduler), Align Your Steps (the published lists, A1111's log-linear resampling), the LCM/TCD timesteps.
diffusers computes in float32, ours in float64: hence the 1e-4 bounds."""
import math

import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.models import ModelConfig, alphas_cumprod
from kiln.samplers import SAMPLERS, Discrete, discrete_denoiser, get_sigmas, parse, resolve
from kiln.samplers.compvis import ddim_timesteps, sample_ddim
from kiln.samplers.schedules import AYS_SD15, AYS_SDXL

AC = alphas_cumprod(ModelConfig()).double()
DISC = Discrete(AC)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def toy_eps(x, t):
    """A smooth, nonlinear, t-dependent noise predictor (samplers only see this function)."""
    s = float(t) / 1000.0
    return torch.tanh(0.8 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + s) + 0.1 * math.sin(3 * s)


def start(seed=0):
    return torch.randn((2, 4, 6, 6), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(steps, gamma):
    from diffusers import TCDScheduler

    sch = TCDScheduler(**SD_BETAS, set_alpha_to_one=False, clip_sample=False)
    sch.set_timesteps(steps)
    sigmas = get_sigmas(DISC, "lcm", steps)
    assert [round(DISC.sigma_to_t(float(s)), 6) for s in sigmas[:-1]] == [float(t) for t in sch.timesteps]
    x_vp = start(3).float()
    gen = torch.Generator().manual_seed(11)
    sample = x_vp.clone()
    for t in sch.timesteps:
        sample = sch.step(toy_eps(sample.double(), int(t)).float(), t, sample, eta=gamma, generator=gen).prev_sample
    gen2 = torch.Generator().manual_seed(11)
    noise = lambda like: torch.randn(like.shape, generator=gen2, dtype=torch.float32).double()  # noqa: E731
    x = x_vp.double() * math.sqrt(1 + float(sigmas[0]) ** 2)  # the VP start latent in the VE frame
    ours = SAMPLERS["tcd"].fn(discrete_denoiser(toy_eps, DISC), x, sigmas, noise=noise, eta=gamma, disc=DISC)
    err = (ours - sample.double()).abs().max().item()
    assert err <= 1e-4, f"TCD γ={gamma}, {steps} steps: max |Δ| = {err}"


def test_tcd_ends_on_step_zero_and_gamma_matters():
    """One step is x̂0 noised to trained step 0 in the VP frame, (x̂0 + σ_0·ε̂)/√(1 + σ_0²), not x̂0 itself; γ changes
    a several-step result."""
    den = discrete_denoiser(toy_eps, DISC)
    sigmas = get_sigmas(DISC, "lcm", 1)
    x = start() * float(sigmas[0])
    x0 = den(x, float(sigmas[0]))
    s0 = float(DISC.sigmas[0])
    want = (x0 + s0 * (x - x0) / float(sigmas[0])) / math.sqrt(1 + s0 ** 2)
    torch.testing.assert_close(SAMPLERS["tcd"].fn(den, x, sigmas, eta=0.3, disc=DISC), want, rtol=0, atol=1e-12)
    assert (want - x0).abs().max() > 1e-3
    sigmas = get_sigmas(DISC, "lcm", 4)
    runs = []
    for gamma in (0.0, 0.3):
        g = torch.Generator().manual_seed(5)
        noise = lambda like: torch.randn(like.shape, generator=g, dtype=torch.float64)  # noqa: E731,B023
        runs.append(SAMPLERS["tcd"].fn(den, start() * float(sigmas[0]), sigmas, noise=noise, eta=gamma, disc=DISC))
    assert (runs[0] - runs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_euler_spacing_matches_diffusers(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    sch = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing=spacing)
    sch.set_timesteps(steps)
    sigmas = get_sigmas(DISC, spacing, steps)
    torch.testing.assert_close(sigmas, sch.sigmas.double(), rtol=1e-5, atol=1e-6)
    x = start(1) * float(sigmas[0])  # both from the same VE latent (diffusers' leading starts at √(σ²+1)·z)
    sample = x.float()
    for t in sch.timesteps:
        model_in = sch.scale_model_input(sample, t)
        sample = sch.step(toy_eps(model_in.double(), float(t)).float(), t, sample).prev_sample
    ours = SAMPLERS["euler"].fn(discrete_denoiser(toy_eps, DISC), x, sigmas)
    err = (ours - sample.double()).abs().max().item()
    assert err <= 1e-4, f"Euler {spacing} {steps} steps: max |Δ| = {err}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 3])
def test_ddim_spacing_matches_diffusers(spacing, steps):
    """The same timesteps always; the same trajectory where diffusers' fixed step back (N // n) lands on the next
    timestep, i.e. leading and trailing with n dividing 1000 (what distilled models use)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing=spacing)
    sch.set_timesteps(steps)
    ts = ddim_timesteps(steps, 1000, spacing)
    assert list(ts[::-1]) == [int(t) for t in sch.timesteps]
    if spacing == "linspace" or 1000 % steps:
        return
    x = start(2)
    sample = x.float()
    for t in sch.timesteps:
        sample = sch.step(toy_eps(sample.double(), int(t)).float(), t, sample, eta=0.0).prev_sample
    ours = sample_ddim(toy_eps, x, AC.float(), steps, discretize=spacing)
    err = (ours - sample.double()).abs().max().item()
    assert err <= 1e-4, f"DDIM {spacing} {steps} steps: max |Δ| = {err}"


def test_align_your_steps_lists_and_resampling():
    """The lists equal diffusers' `AysSchedules` (which end in 0 where NVIDIA's end in 0.029); other step counts
    are A1111's log-linear resampling; SDXL models take the SDXL list."""
    from diffusers.schedulers import AysSchedules

    assert list(AYS_SD15[:-1]) == AysSchedules["StableDiffusionSigmas"][:-1]
    assert list(AYS_SDXL[:-1]) == AysSchedules["StableDiffusionXLSigmas"][:-1]
    assert get_sigmas(DISC, "align_your_steps", 11).tolist() == [*AYS_SD15, 0.0]
    xl = Discrete(AC, sdxl=True)
    assert get_sigmas(xl, "align_your_steps", 11).tolist() == [*AYS_SDXL, 0.0]
    for n in (2, 4, 8, 30):
        # A1111's loglinear_interp, written out: np.interp of log σ (reversed to ascend) at n even positions
        want = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(AYS_SD15[::-1])))[::-1]
        got = get_sigmas(DISC, "align_your_steps", n)
        assert len(got) == n + 1 and got[-1] == 0
        np.testing.assert_allclose(got[:-1].numpy(), want, rtol=1e-12)
    assert get_sigmas(xl, "align_your_steps", 4)[1] != get_sigmas(DISC, "align_your_steps", 4)[1]
    # one step starts from the top (A1111's reversed interpolation puts its single level at the bottom, 0.029)
    assert get_sigmas(DISC, "align_your_steps", 1).tolist() == [14.615, 0.0]


def test_registry_names_and_errors():
    assert parse("TCD")[0].name == "tcd" and resolve("tcd")[1] == "lcm" and SAMPLERS["tcd"].eta == 0.3
    assert parse("Euler", "Align Your Steps")[1] == "align_your_steps"
    assert parse("Euler Align Your Steps")[1] == "align_your_steps"  # A1111's old-style combined label
    assert parse("euler", "AYS")[1] == "align_your_steps"
    assert parse("DDIM", "trailing")[1] == "trailing" and parse("PLMS", "Leading")[1] == "leading"
    assert parse("Euler a", "Trailing")[1] == "trailing"
    with pytest.raises(ValueError, match="leading, trailing or linspace"):
        parse("ddim", "align_your_steps")
    with pytest.raises(ValueError, match="at most 50"):
        get_sigmas(DISC, "lcm", 51)


def test_generation_checks_tcd_gamma_and_lcm_steps(pipe):
    from kiln.pipeline.params import GenerationParams, check

    assert check(GenerationParams(prompt="x", sampler="tcd", steps=4), pipe).eta == 0.3
    with pytest.raises(KilnError, match="eta must be between 0 and 1 for tcd"):
        check(GenerationParams(prompt="x", sampler="tcd", steps=4, eta=1.5), pipe)
    with pytest.raises(KilnError, match="lcm schedule has at most 50 steps"):
        check(GenerationParams(prompt="x", sampler="tcd", steps=60), pipe)


@pytest.mark.parametrize("sampler,schedule,eta", [("tcd", None, 0.5), ("euler", "trailing", None),
                                                  ("ddim", "trailing", None), ("euler", "align_your_steps", None)])
def test_few_step_samplers_run_on_the_demo_model(pipe, sampler, schedule, eta):
    """Four steps on the embedded model give a real picture, recorded with its schedule (and TCD's γ) in the
    infotext, from which the same picture is made again."""
    from kiln.pipeline.infotext import params_from_infotext, parse_infotext

    res = pipe.txt2img("a red circle", steps=4, sampler=sampler, schedule=schedule, eta=eta, cfg_scale=2.0, seed=3,
                       width=64, height=64)
    img = np.asarray(res.images[0], dtype=np.float64)
    assert img.std() > 20
    assert res.params["schedule"] == (schedule or "lcm")
    again = params_from_infotext(parse_infotext(res.infotexts[0]))
    assert again["sampler"] == sampler and again["schedule"] == (schedule or "lcm") and again.get("eta") == eta
    again.pop("batch_pos", None)
    assert np.array_equal(pipe.txt2img(**again).pixels, res.pixels)
