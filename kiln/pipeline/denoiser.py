"""The denoiser the samplers call, built from small wrappers around the UNet.

Two levels, each a plain function:
- a *model call* `call(x, t, cond) -> out`: the network on a batch in the compute dtype (`unet_call`, whole or in
  tiles, with DeepCache's feature cache), wrapped by what changes its inputs (`with_channels`: an inpainting
  model's extra channels; ControlNet residuals would be one more such wrapper);
- a *noise predictor* `eps(x, t) -> ε` on fp32 latents at step t (fractional t allowed): `guided` runs one
  batched model call for [uncond, cond] and mixes them (classifier-free guidance); `v_to_eps` turns a
  v-prediction model's output into ε so that every sampler works on ε.

`guided` takes its conditioning from `conds(t)`, a `kiln.pipeline.conds.Mix` per step: `fixed` is the constant
one, `kiln.pipeline.conds.prompt_conds` the one of prompt editing, alternation and AND. The k-diffusion
samplers see `eps` through `kiln.samplers.discrete_denoiser`, and the refiner's switch is a split of the step
range (`kiln.samplers.run.sample`).
"""
from __future__ import annotations

import torch

from ..models.unet import FeatureCache
from ..tiling import tiled_cover
from ..errors import KilnError
from .conds import fixed_mix
from .control import with_control
from .text import Cond
from .vae import tiled


def unet_call(pipe, tile: str = "auto", deepcache=None):
    """The UNet as a model call; in overlapping tiles of the native size where `tile` asks for them. DeepCache
    (interval, depth) keeps its feature cache for the life of this call (one sampling run)."""
    unet = pipe.model.unet
    ks = pipe.native_size // pipe.cfg.downscale
    cache = FeatureCache(*deepcache) if deepcache else None

    def call(x, t, c: Cond, control=None):
        if tiled(pipe, tile, x.shape[-2:]):
            if control is not None:
                raise KilnError("ControlNet does not run on a tiled UNet yet: pass tile off (--tile off)")
            return tiled_cover(lambda z: unet(z, t, c.context, c.vector), x, ks, ks * 3 // 4)
        return unet(x, t, c.context, c.vector, cache=cache, control=control)

    return call


def external_call(fn):
    """A model call from `fn(x, t, context)` (kiln.compat's tiled `apply_model`)."""
    return lambda x, t, c: fn(x, t, c.context)


def with_channels(call, extra: torch.Tensor):
    """Inpainting models: `extra` (mask and masked-image latents, [B, 5, h, w]) appended to the input channels."""
    def channels(x, t, c, **kw):
        e = extra.to(x.device, x.dtype)
        e = e.repeat(x.shape[0] // e.shape[0], 1, 1, 1) if c.images is None else e[c.images.to(e.device)]
        return call(torch.cat([x, e], dim=1), t, c, **kw)

    return channels


def fixed(cond: Cond, uncond: Cond | None):
    """The same conditioning at every step: `conds(t)` = one `Mix` of [uncond, cond] (cond alone without
    guidance)."""
    mix = fixed_mix(cond, uncond)
    return lambda t: mix


def guided(call, conds, scale: float, dtype, device):
    """ε(x, t) with classifier-free guidance: ε_u + scale · (ε_c − ε_u) (summed over the sub-prompts of AND), from
    one model call on the rows `conds(t)` asks for."""
    def eps(x, t):
        mix = conds(t)
        xin = x.to(dtype)
        rows = xin if mix.sources.shape[0] == x.shape[0] and mix.plain else xin[mix.sources.to(x.device)]
        out = call_rows(call, rows, float(t), mix.cond, device)
        return mix.combine(out.float(), scale)

    return eps


def call_rows(call, x, t: float, c: Cond, device):
    """The model on all rows in one call; on running out of GPU memory, in halves (as few calls as fit)."""
    try:
        return call(x, torch.full((x.shape[0],), t, device=device), c)
    except torch.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    half = x.shape[0] // 2
    rows = lambda t, a, b: None if t is None else t[a:b]
    part = lambda a, b: Cond(c.context[a:b], rows(c.vector, a, b), rows(c.images, a, b), rows(c.prompt_rows, a, b))
    return torch.cat([call_rows(call, x[:half], t, part(0, half), device),
                      call_rows(call, x[half:], t, part(half, None), device)])


def v_to_eps(eps, disc):
    """A v-prediction model's output as ε: ε = √ᾱ·v + √(1−ᾱ)·x."""
    def converted(x, t):
        a = disc.alpha_cumprod_at(t)
        return a ** 0.5 * eps(x, t) + (1 - a) ** 0.5 * x

    return converted


def build(pipe, cond, uncond, scale, *, concat=None, tile="auto", model_call=None, control=None):
    """The guided noise predictor of `pipe` for this conditioning (`cond` and `uncond` Conds, or `cond` a per-step
    `conds(t)`): the wrappers above, in order."""
    if callable(cond):  # a per-step source (`kiln.pipeline.conds.prompt_conds`)
        conds = cond
    else:
        cond = cond if isinstance(cond, Cond) else Cond(cond)
        uncond = uncond if uncond is None or isinstance(uncond, Cond) else Cond(uncond)
        conds = fixed(cond, uncond)
    call = model_call or unet_call(pipe, tile, pipe.deepcache)
    if concat is not None:
        call = with_channels(call, concat)
    if control is not None:  # (units, clock): outside the inpainting channels, as ControlNets see 4 channels
        call = with_control(call, *control)
    eps = guided(call, conds, scale, pipe.dtype, pipe.device)
    return v_to_eps(eps, pipe.discrete) if pipe.cfg.parameterization == "v" else eps
