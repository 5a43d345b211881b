"""The k-diffusion-style samplers and schedules against independent references, on one analytic noise predictor.

References:
- k-diffusion 0.1.1.post1 `sampling.py` (Crowson; installed without its heavy dependencies, see `kdiff` below) with
  its `external.CompVisDenoiser` wrapper: euler … dpmpp_3m_sde, and the normal/karras/exponential schedules;
- diffusers `UniPCMultistepScheduler` (predict_x0, lower_order_final, final sigma 0) for UniPC;
- diffusers `DDPMScheduler` (fixed_small variance, no clipping) for DDPM.
Conventions: x in k-diffusion's variance-exploding frame x0 + σ·ε; everything in float64 except diffusers
(float32 inside), hence the 1e-4 bound of the issue.
"""
import importlib.util
import math
import sys
import types

import pytest
import torch

from kiln.models import ModelConfig, alphas_cumprod
from kiln.samplers import SAMPLERS, Discrete, discrete_denoiser, get_sigmas, parse, resolve
from kiln.samplers.schedules import SCHEDULES

AC = alphas_cumprod(ModelConfig()).double()
DISC = Discrete(AC)


def toy_eps(x, t):
    """A smooth, nonlinear, t-dependent noise predictor (samplers only see this function)."""
    s = float(t) / 1000.0
    return torch.tanh(0.8 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + s) + 0.1 * math.sin(3 * s)


@pytest.fixture(scope="module")
def kdiff():
    """k_diffusion.sampling and .external without the package's __init__ (which needs torchvision, wandb, …)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is a test dependency: pip install --no-deps k-diffusion==0.1.1.post1")
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling",
                                              "k_diffusion.external")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    pkg.utils = utils
    mods = {}
    for name in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"k_diffusion.{name}",
                                                   f"{pkg.__path__[0]}/{name}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"k_diffusion.{name}"] = m
        s.loader.exec_module(m)
        setattr(pkg, name, m)
        mods[name] = m
    yield types.SimpleNamespace(**mods)
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


class FakeCompVisModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", AC.clone())

    def apply_model(self, x, t, cond=None):
        assert torch.all(t == t[0])
        return toy_eps(x, float(t[0]))


def start_noise(seed=0, shape=(2, 4, 6, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class NoiseSeq:
    """The same fresh-noise stream for both implementations: ours calls noise(x), k-diffusion noise_sampler(σ, σ')."""

    def __init__(self, shape, seed=7):
        self.g = torch.Generator().manual_seed(seed)
        self.shape = shape

    def __call__(self, *_):
        return torch.randn(self.shape, generator=self.g, dtype=torch.float64)


K_NAMES = {"euler": "sample_euler", "euler_a": "sample_euler_ancestral", "heun": "sample_heun",
           "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral", "lms": "sample_lms",
           "dpmpp_2s_a": "sample_dpmpp_2s_ancestral", "dpmpp_sde": "sample_dpmpp_sde",
           "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential"])
def test_schedules_match_k_diffusion(kdiff, schedule):
    den = kdiff.external.CompVisDenoiser(FakeCompVisModel())
    for n in (1, 7, 20):
        ours = get_sigmas(DISC, schedule, n)
        if schedule == "normal":
            ref = den.get_sigmas(n)
        else:
            fn = {"karras": kdiff.sampling.get_sigmas_karras, "exponential": kdiff.sampling.get_sigmas_exponential}
            ref = fn[schedule](n, float(den.sigma_min), float(den.sigma_max))
        assert ours.shape == ref.shape and ours[-1] == 0
        assert torch.allclose(ours, ref.double(), rtol=1e-6, atol=0), (n, ours, ref)


def test_other_schedules_are_decreasing_and_in_range():
    for name in SCHEDULES:
        for n in (1, 2, 10, 50):
            s = get_sigmas(DISC, name, n)
            assert len(s) == n + 1 and s[-1] == 0
            # (Align Your Steps' published top level, 14.615, is σ_max rounded to 3 decimals)
            assert torch.all(s[:-1] > 0) and torch.all(s[:-1] <= DISC.sigma_max + (1e-3 if "align" in name else 1e-9))
            assert torch.all(s[1:] < s[:-1]), (name, n, s)
    # sgm_uniform drops the t = 0 end point; simple counts down in whole trained steps
    assert get_sigmas(DISC, "simple", 10)[0] == DISC.sigma_max
    assert get_sigmas(DISC, "sgm_uniform", 4)[3] == pytest.approx(DISC.t_to_sigma(999 / 4), rel=1e-9)


def test_sigma_t_round_trip_and_denoiser_matches_compvis_denoiser(kdiff):
    den = kdiff.external.CompVisDenoiser(FakeCompVisModel())
    for t in (0.0, 0.5, 13.25, 500.0, 998.9, 999.0):
        assert DISC.sigma_to_t(DISC.t_to_sigma(t)) == pytest.approx(t, abs=1e-9)
        sigma = torch.tensor(DISC.t_to_sigma(t), dtype=torch.float64)
        assert float(den.sigma_to_t(sigma)) == pytest.approx(t, abs=1e-6)
    x = start_noise() * 3
    ours = discrete_denoiser(toy_eps, DISC)
    for sigma in (0.05, 1.0, 7.3):
        ref = den(x, torch.full((2,), sigma, dtype=torch.float64))
        assert (ours(x, sigma) - ref).abs().max() < 1e-9


@pytest.mark.parametrize("name", list(K_NAMES))
@pytest.mark.parametrize("schedule,steps", [("karras", 12), ("normal", 7)])
def test_sampler_matches_k_diffusion(kdiff, name, schedule, steps):
    spec = SAMPLERS[name]
    sigmas = get_sigmas(DISC, schedule, steps)
    x = start_noise() * float(sigmas[0])
    ref_fn = getattr(kdiff.sampling, K_NAMES[name])
    den_ref = kdiff.external.CompVisDenoiser(FakeCompVisModel())
    kw_ref, kw_ours = {}, {}
    if spec.stochastic:
        kw_ref["noise_sampler"] = NoiseSeq(x.shape)
        kw_ours["noise"] = NoiseSeq(x.shape)
    ref = ref_fn(den_ref, x.clone(), sigmas.clone(), disable=True, **kw_ref)
    ours = spec.fn(discrete_denoiser(toy_eps, DISC), x.clone(), sigmas, **kw_ours)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"{name} {schedule}: max |Δ| = {err}"
    assert ours.abs().max() < 50  # and it produced something sensible


@pytest.mark.parametrize("name", ["euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_with_eta_zero_match_reference_eta_zero(kdiff, name):
    sigmas = get_sigmas(DISC, "karras", 10)
    x = start_noise(3) * float(sigmas[0])
    ref = getattr(kdiff.sampling, K_NAMES[name])(kdiff.external.CompVisDenoiser(FakeCompVisModel()), x.clone(),
                                                 sigmas.clone(), disable=True, eta=0.0,
                                                 noise_sampler=NoiseSeq(x.shape))
    ours = SAMPLERS[name].fn(discrete_denoiser(toy_eps, DISC), x.clone(), sigmas, eta=0.0)  # no noise source needed
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant,final", [("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero")])
@pytest.mark.parametrize("steps", [5, 12])
def test_unipc_matches_diffusers(variant, final, steps):
    """diffusers' bh1 with a final σ of 0 returns NaN (B(h) = −h is infinite there), so bh1 is compared on a
    schedule that ends at σ_min; ours takes the exact limit at σ = 0 (the data prediction), as bh2 does."""
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", solver_order=3, solver_type=variant,
                                  predict_x0=True, lower_order_final=True, final_sigmas_type=final)
    sch.set_timesteps(steps)
    x_vp = start_noise(5).float()
    sample = x_vp.clone()
    for t in sch.timesteps:
        eps = toy_eps(sample.double(), int(t)).float()
        sample = sch.step(eps, t, sample).prev_sample
    assert torch.isfinite(sample).all()
    sigmas = sch.sigmas.double()
    assert len(sigmas) == steps + 1 and (sigmas[-1] == 0) == (final == "zero")
    x = x_vp.double() * math.sqrt(1 + float(sigmas[0]) ** 2)  # the VP start latent in the VE frame
    ours = SAMPLERS["unipc"].fn(discrete_denoiser(toy_eps, DISC), x, sigmas, variant=variant, order=3)
    ours = ours / math.sqrt(1 + float(sigmas[-1]) ** 2)  # back to the VP frame (a no-op at σ = 0)
    err = (ours - sample.double()).abs().max().item()
    assert err <= 1e-4, f"UniPC {variant} {steps} steps: max |Δ| = {err}"


def test_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler

    steps = 20
    sch = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, variance_type="fixed_small", thresholding=False)
    sch.set_timesteps(steps)
    x_vp = start_noise(9).float()
    gen = torch.Generator().manual_seed(11)
    sample = x_vp.clone()
    for t in sch.timesteps:
        sample = sch.step(toy_eps(sample.double(), int(t)).float(), t, sample, generator=gen).prev_sample
    ts = [int(t) for t in sch.timesteps]
    sigmas = torch.tensor([float(DISC.sigmas[t]) for t in ts] + [0.0], dtype=torch.float64)
    gen2 = torch.Generator().manual_seed(11)
    noise = lambda like: torch.randn(like.shape, generator=gen2, dtype=torch.float32).double()
    x = x_vp.double() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = SAMPLERS["ddpm"].fn(discrete_denoiser(toy_eps, DISC), x, sigmas, noise=noise)
    err = (ours - sample.double()).abs().max().item()
    assert err <= 1e-4, f"DDPM: max |Δ| = {err}"


def test_lcm_is_denoise_then_renoise():
    """LCM (as ComfyUI's `sample_lcm`): x ← D(x, σ_i), then x ← x + σ_{i+1}·z while σ_{i+1} > 0."""
    sigmas = get_sigmas(DISC, "sgm_uniform", 4)
    den = discrete_denoiser(toy_eps, DISC)
    x0 = start_noise(2) * float(sigmas[0])
    zs = NoiseSeq(x0.shape, seed=3)
    x = x0.clone()
    for i in range(4):
        x = den(x, float(sigmas[i]))
        if sigmas[i + 1] > 0:
            x = x + float(sigmas[i + 1]) * zs()
    ours = SAMPLERS["lcm"].fn(den, x0.clone(), sigmas, noise=NoiseSeq(x0.shape, seed=3))
    assert torch.equal(ours, x)


# ---------------------------------------------------------------------------------------------- analytic checks
GAUSS_S = 0.7  # data ~ N(0, s²): the exact denoiser is s²/(s²+σ²)·x and the ODE solution is known


def gauss_denoise(x, sigma):
    return x * GAUSS_S ** 2 / (GAUSS_S ** 2 + sigma ** 2)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.kind == "denoise" and not s.stochastic])
def test_deterministic_samplers_solve_the_gaussian_ode(name):
    """Probability-flow ODE for Gaussian data: x(0) = x(σ_max)·s/√(s²+σ_max²). 100 steps must get close."""
    sigmas = get_sigmas(DISC, "karras", 100)
    x = start_noise(1) * float(sigmas[0])
    exact = x * GAUSS_S / math.sqrt(GAUSS_S ** 2 + float(sigmas[0]) ** 2)
    out = SAMPLERS[name].fn(gauss_denoise, x, sigmas)
    rel = ((out - exact).norm() / exact.norm()).item()
    bound = 2.5e-2 if name == "euler" else 2e-3  # first order vs higher order (measured: 1.7e-2; ≤ 8.7e-4)
    assert rel < bound, f"{name}: relative error {rel:.2e}"


# TCD ends on trained step 0, x̂0 + σ_0·ε̂ (as diffusers' TCDScheduler; tests/test_samplers_distilled.py)
@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.kind == "denoise" and n != "tcd"])
def test_every_sampler_returns_the_only_data_point(name):
    """With a single data point x*, the exact denoiser is constant; every sampler must end exactly at x*."""
    target = start_noise(4)
    sigmas = get_sigmas(DISC, SAMPLERS[name].schedule, 8)
    x = start_noise(5) * float(sigmas[0])
    out = SAMPLERS[name].fn(lambda x, s: target.clone(), x, sigmas, noise=NoiseSeq(x.shape))
    assert torch.allclose(out, target, atol=1e-9)


def test_stochastic_samplers_use_the_noise():
    sigmas = get_sigmas(DISC, "karras", 6)
    x = start_noise(6) * float(sigmas[0])
    den = discrete_denoiser(toy_eps, DISC)
    for name, spec in SAMPLERS.items():
        if spec.kind != "denoise" or not spec.stochastic:
            continue
        a = spec.fn(den, x.clone(), sigmas, noise=NoiseSeq(x.shape, 1), disc=DISC)
        b = spec.fn(den, x.clone(), sigmas, noise=NoiseSeq(x.shape, 2), disc=DISC)
        assert (a - b).abs().max() > 1e-3, name


@pytest.mark.parametrize("label,name,schedule", [
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("DPM++ 2M", "dpmpp_2m", "karras"), ("Euler a", "euler_a", "normal"),
    ("euler_a", "euler_a", "normal"), ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
    ("DPM++ SDE Karras", "dpmpp_sde", "karras"), ("LMS Karras", "lms", "karras"), ("DPM2 a", "dpm2_a", "karras"),
    ("k_dpmpp_2m", "dpmpp_2m", "karras"), ("UniPC", "unipc", "karras"), ("DDIM", "ddim", "normal"),
    ("Euler SGM Uniform", "euler", "sgm_uniform"), ("LCM", "lcm", "karras"),
])
def test_a1111_names_resolve(label, name, schedule):
    spec, sched = resolve(label)
    assert (spec.name, sched) == (name, schedule)


def test_explicit_schedule_wins_and_bad_names_are_refused():
    assert resolve("DPM++ 2M Karras", "Exponential")[1] == "exponential"
    assert resolve("DPM++ 2M", "Automatic")[1] == "karras"
    assert resolve("Euler", "Uniform")[1] == "normal"
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve("DPM++ 9M")
    with pytest.raises(ValueError, match="unknown schedule"):
        resolve("euler", "wobbly")


def test_ddim_and_plms_take_compvis_discretizations_only():
    assert resolve("PLMS", "Quad") == (SAMPLERS["plms"], "quad")
    assert resolve("ddim", "uniform") == (SAMPLERS["ddim"], "normal")
    with pytest.raises(ValueError, match="normal .* trailing or linspace, not karras"):
        resolve("ddim", "Karras")
    # A1111's API and infotexts: A1111 ignores a schedule type for DDIM/PLMS, and so does kiln there
    assert resolve("DDIM", "Karras", lenient=True) == (SAMPLERS["ddim"], "normal")
    with pytest.raises(ValueError, match="quad is CompVis' DDIM/PLMS"):
        resolve("euler", "quad", lenient=True)


def test_a_models_default_schedule_applies_only_when_none_is_asked_for():
    own = {"plms": "quad"}  # the embedded demo model's config
    assert resolve("plms", defaults=own)[1] == resolve("PLMS", "Automatic", defaults=own)[1] == "quad"
    assert resolve("plms", "normal", defaults=own)[1] == "normal"  # asked for: CompVis' uniform grid
    assert resolve("ddim", defaults=own)[1] == "normal" and resolve("plms")[1] == "normal"
    assert resolve("DDIM", "Karras", lenient=True, defaults={"ddim": "quad"})[1] == "quad"  # ignored → default
    assert parse("PLMS") == (SAMPLERS["plms"], None) and parse("DPM++ 2M Karras")[1] == "karras"
    assert parse("DDIM", "Karras", lenient=True) == (SAMPLERS["ddim"], None)
    with pytest.raises(ValueError, match="not karras"):  # a model's default is checked like a request's
        resolve("plms", defaults={"plms": "karras"})


def test_registry_labels_and_names_are_unique():
    labels = [s.label for s in SAMPLERS.values()]
    assert len(set(labels)) == len(labels) == len(SAMPLERS) == 17
