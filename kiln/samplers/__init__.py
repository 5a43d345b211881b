"""Samplers as small functions over a noise predictor `eps_fn(x, t)`; one registry for every front end."""
from .compvis import ddim_schedule, ddim_timesteps, sample_ddim, sample_plms

SAMPLERS = {
    "ddim": sample_ddim,
    "plms": sample_plms,
}


def get_sampler(name: str):
    try:
        return SAMPLERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "get_sampler", "sample_ddim", "sample_plms", "ddim_schedule", "ddim_timesteps"]
