"""Samplers as small functions; one registry (data) that the CLI, the API and the web UI all read.

Two kinds of sampler function:
- "eps" (DDIM, PLMS as CompVis wrote them): `fn(eps_fn, x, alphas_cumprod, steps, eta, noise, callback, start)`
  over the noise predictor `eps_fn(x_t, t)` on the discrete steps;
- "denoise" (the k-diffusion family): `fn(denoise, x, sigmas, noise=, callback=, eta=, s_noise=)` over a
  denoiser `denoise(x, σ)`. `discrete_denoiser` makes one from `eps_fn` (k-diffusion's CompVisDenoiser).

Adding a sampler: write the function, add one `Sampler(...)` line below.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import kdiffusion as k
from .compvis import ddim_schedule, ddim_timesteps, sample_ddim, sample_plms
from .schedules import COMPVIS_DISCRETIZE, MAX_STEPS, SCHEDULE_LABELS, SCHEDULES, Discrete, get_sigmas, resolve_schedule
from .run import discrete_denoiser
from .unipc import sample_unipc


@dataclass(frozen=True)
class Sampler:
    name: str           # our spelling, used on the CLI and in the native API
    label: str          # A1111's display name, used in infotexts and /sdapi/v1/samplers
    fn: object
    kind: str = "denoise"        # "denoise" or "eps"
    stochastic: bool = False     # draws fresh noise while sampling
    eta: float | None = None     # default eta where the method has one (None: no eta)
    schedule: str = "normal"     # the default schedule ("Automatic")
    evals_per_step: int = 1
    aliases: tuple = ()
    eta_max: float | None = None  # where eta is bounded (TCD's gamma is a fraction of the step)
    vp_start: bool = False  # txt2img starts from unit noise in the VP frame, x_T = ε (as TCDScheduler), not σ_max·ε


SAMPLER_LIST = [
    Sampler("euler", "Euler", k.sample_euler, aliases=("k_euler",)),
    Sampler("euler_a", "Euler a", k.sample_euler_a, stochastic=True, eta=1.0,
            aliases=("k_euler_a", "euler_ancestral")),
    Sampler("heun", "Heun", k.sample_heun, evals_per_step=2, aliases=("k_heun",)),
    Sampler("dpm2", "DPM2", k.sample_dpm2, schedule="karras", evals_per_step=2, aliases=("k_dpm_2", "dpm_2")),
    Sampler("dpm2_a", "DPM2 a", k.sample_dpm2_a, stochastic=True, eta=1.0, schedule="karras", evals_per_step=2,
            aliases=("k_dpm_2_a", "dpm_2_ancestral")),
    Sampler("lms", "LMS", k.sample_lms, schedule="karras", aliases=("k_lms",)),
    Sampler("dpmpp_2s_a", "DPM++ 2S a", k.sample_dpmpp_2s_a, stochastic=True, eta=1.0, schedule="karras",
            evals_per_step=2, aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral")),
    Sampler("dpmpp_sde", "DPM++ SDE", k.sample_dpmpp_sde, stochastic=True, eta=1.0, schedule="karras",
            evals_per_step=2, aliases=("k_dpmpp_sde",)),
    Sampler("dpmpp_2m", "DPM++ 2M", k.sample_dpmpp_2m, schedule="karras", aliases=("k_dpmpp_2m",)),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", k.sample_dpmpp_2m_sde, stochastic=True, eta=1.0,
            schedule="exponential", aliases=("k_dpmpp_2m_sde",)),
    Sampler("dpmpp_3m_sde", "DPM++ 3M SDE", k.sample_dpmpp_3m_sde, stochastic=True, eta=1.0,
            schedule="exponential", aliases=("k_dpmpp_3m_sde",)),
    Sampler("unipc", "UniPC", sample_unipc, schedule="karras", aliases=("uni_pc",)),
    Sampler("lcm", "LCM", k.sample_lcm, stochastic=True, schedule="karras"),
    Sampler("tcd", "TCD", k.sample_tcd, stochastic=True, eta=0.3, schedule="lcm", eta_max=1.0,
            vp_start=True),
    Sampler("ddpm", "DDPM", k.sample_ddpm, stochastic=True, eta=1.0),
    Sampler("ddim", "DDIM", sample_ddim, kind="eps", eta=0.0),
    Sampler("plms", "PLMS", sample_plms, kind="eps"),
]
SAMPLERS = {s.name: s for s in SAMPLER_LIST}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_").replace("+", "p")


_LOOKUP = {}
for _s in SAMPLER_LIST:
    for _n in (_s.name, _s.label, *_s.aliases):
        _LOOKUP[_key(_n)] = _s.name


def parse(name: str, schedule: str | None = None, lenient: bool = False) -> tuple[Sampler, str | None]:
    """(sampler, the schedule asked for) from our names or A1111's, including old-style labels such as
    "DPM++ 2M Karras"; the schedule is None when none is asked for ("", "Automatic"), i.e. the default.

    A schedule inside the label counts only when no explicit one is given. DDIM and PLMS take CompVis'
    discretizations only ("normal", "quad"); any other schedule is an error, or, with `lenient` (A1111's API
    and infotexts, where A1111 ignores it), the default."""
    key = _key(name)
    embedded = None
    if key not in _LOOKUP:
        for sched in sorted(SCHEDULE_LABELS, key=len, reverse=True):
            for spelled in {sched, _key(SCHEDULE_LABELS[sched])}:
                if key.endswith("_" + spelled) and key[: -len(spelled) - 1] in _LOOKUP:
                    key, embedded = key[: -len(spelled) - 1], sched
                    break
            if embedded:
                break
    if key not in _LOOKUP:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[_LOOKUP[key]]
    chosen = resolve_schedule(schedule) or embedded
    if chosen is not None and sampler.kind == "eps" and chosen not in COMPVIS_DISCRETIZE:
        if not lenient:
            raise ValueError(f"{sampler.name} steps on trained timesteps: schedule normal (CompVis' uniform, the "
                             f"default), quad, leading, trailing or linspace, not {chosen}")
        chosen = None
    if chosen is not None and sampler.kind == "denoise" and chosen not in SCHEDULES:
        raise ValueError(f"schedule {chosen} is CompVis' DDIM/PLMS discretization; {sampler.name} takes one of: "
                         f"{', '.join(SCHEDULES)}")
    return sampler, chosen


def model_default(sampler: Sampler, defaults: dict | None) -> str | None:
    """The schedule a model's config (`defaults`, its `sampler_schedules`) sets for `sampler`, checked like a
    request's; None where it sets none."""
    own = (defaults or {}).get(sampler.name)
    return parse(sampler.name, own)[1] if own else None


def resolve(name: str, schedule: str | None = None, lenient: bool = False,
            defaults: dict | None = None) -> tuple[Sampler, str]:
    """(sampler, schedule) as `parse`, with no schedule asked for meaning the sampler's default: the model's
    (`model_default`) where it sets one, else the registry's."""
    sampler, chosen = parse(name, schedule, lenient)
    return sampler, chosen or model_default(sampler, defaults) or sampler.schedule


def get_sampler(name: str) -> Sampler:
    return resolve(name)[0]


__all__ = ["SAMPLERS", "SAMPLER_LIST", "SCHEDULES", "COMPVIS_DISCRETIZE", "MAX_STEPS", "Sampler", "parse", "resolve",
           "model_default", "get_sampler", "discrete_denoiser", "Discrete", "get_sigmas", "sample_ddim", "sample_plms",
           "ddim_schedule", "ddim_timesteps"]
