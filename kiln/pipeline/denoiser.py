"""The denoiser the samplers call, built from small wrappers around the UNet.

Two levels, each a plain function:
- a *model call* `call(x, t, cond) -> out`: the network on a batch in the compute dtype (`unet_call`, whole or in
  tiles, with DeepCache's feature cache), wrapped by what changes its inputs (`with_channels`: an inpainting
  model's extra channels; ControlNet residuals would be one more such wrapper);
- a *noise predictor* `eps(x, t) -> ε` on fp32 latents at step t (fractional t allowed): `guided` runs one
  batched model call for [uncond, cond] and mixes them (classifier-free guidance); `v_to_eps` turns a
  v-prediction model's output into ε so that every sampler works on ε.

`guided` takes its conditioning from `conds(t)`, so a per-step source (prompt schedules) is one more function;
`fixed` is the constant one. The k-diffusion samplers see `eps` through `kiln.samplers.discrete_denoiser`, and
the refiner's switch is a split of the step range (`kiln.samplers.run.sample`).
"""
from __future__ import annotations

import torch

from ..models.unet import FeatureCache
from ..tiling import tiled_cover
from .text import Cond
from .vae import tiled


def unet_call(pipe, tile: str = "auto", deepcache=None):
    """The UNet as a model call; in overlapping tiles of the native size where `tile` asks for them. DeepCache
    (interval, depth) keeps its feature cache for the life of this call (one sampling run)."""
    unet = pipe.model.unet
    ks = pipe.native_size // pipe.cfg.downscale
    cache = FeatureCache(*deepcache) if deepcache else None

    def call(x, t, c: Cond):
        if tiled(pipe, tile, x.shape[-2:]):
            return tiled_cover(lambda z: unet(z, t, c.context, c.vector), x, ks, ks * 3 // 4)
        return unet(x, t, c.context, c.vector, cache=cache)

    return call


def external_call(fn):
    """A model call from `fn(x, t, context)` (kiln.compat's tiled `apply_model`)."""
    return lambda x, t, c: fn(x, t, c.context)


def with_channels(call, extra: torch.Tensor):
    """Inpainting models: `extra` (mask and masked-image latents, [B, 5, h, w]) appended to the input channels."""
    def channels(x, t, c):
        e = extra.to(x.device, x.dtype)
        return call(torch.cat([x, e.repeat(x.shape[0] // e.shape[0], 1, 1, 1)], dim=1), t, c)

    return channels


def batched(cond: Cond, uncond: Cond | None) -> Cond:
    """[uncond, cond] as one batch (cond alone without guidance)."""
    if uncond is None:
        return cond
    return Cond(torch.cat([uncond.context, cond.context]),
                None if cond.vector is None else torch.cat([uncond.vector, cond.vector]))


def fixed(cond: Cond, uncond: Cond | None):
    """The same conditioning at every step: `conds(t)` = (batched conditioning, whether it holds uncond)."""
    both = batched(cond, uncond)
    return lambda t: (both, uncond is not None)


def guided(call, conds, scale: float, dtype, device):
    """ε(x, t) with classifier-free guidance: ε_u + scale · (ε_c − ε_u), from one call on [x, x]."""
    def eps(x, t):
        c, with_uncond = conds(t)
        xin = x.to(dtype)
        if not with_uncond:
            return call(xin, torch.full((x.shape[0],), float(t), device=device), c).float()
        out_u, out_c = call(torch.cat([xin, xin]), torch.full((2 * x.shape[0],), float(t), device=device),
                            c).float().chunk(2)
        return out_u + scale * (out_c - out_u)

    return eps


def v_to_eps(eps, disc):
    """A v-prediction model's output as ε: ε = √ᾱ·v + √(1−ᾱ)·x."""
    def converted(x, t):
        a = disc.alpha_cumprod_at(t)
        return a ** 0.5 * eps(x, t) + (1 - a) ** 0.5 * x

    return converted


def build(pipe, cond, uncond, scale, *, concat=None, tile="auto", model_call=None):
    """The guided noise predictor of `pipe` for this conditioning: the wrappers above, in order."""
    cond = cond if isinstance(cond, Cond) else Cond(cond)
    uncond = uncond if uncond is None or isinstance(uncond, Cond) else Cond(uncond)
    call = model_call or unet_call(pipe, tile, pipe.deepcache)
    if concat is not None:
        call = with_channels(call, concat)
    eps = guided(call, fixed(cond, uncond), scale, pipe.dtype, pipe.device)
    return v_to_eps(eps, pipe.discrete) if pipe.cfg.parameterization == "v" else eps
