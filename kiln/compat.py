"""CompVis-compatible Python API: the `ldm` objects the SD v1 scripts and notebooks use, over kiln's internals.

    from kiln.compat import load_model_from_config, DDIMSampler   # instead of the ldm imports
    model = load_model_from_config(config, "sd-v1-4.ckpt")
    sampler = DDIMSampler(model)
    with torch.no_grad(), model.ema_scope():
        uc = model.get_learned_conditioning(batch_size * [""])
        c = model.get_learned_conditioning(prompts)
        samples, _ = sampler.sample(S=50, conditioning=c, batch_size=batch_size, shape=[4, 64, 64],
                                    unconditional_guidance_scale=7.5, unconditional_conditioning=uc, eta=0.0)
        x = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)

No second implementation: conditioning is `Pipeline.encode_prompts`, the model is kiln's `LatentDiffusion`, and the
samplers are `kiln.samplers.compvis`. Noise follows CompVis: drawn from torch's global generator on the model's
device (seed it with `torch.manual_seed`), so `x_T` is what to pass for a fixed start.
See docs/migrating-from-compvis.md.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from .pipeline import Pipeline, load
from .samplers.compvis import Intermediates, Known, ddim_schedule, sample_ddim, sample_plms
from .tiling import from_split_input_params, tiled


class DiagonalGaussianDistribution:
    """CompVis' posterior: `.sample()`, `.mode()`, `.mean`, `.std`, `.logvar`."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar
        self.std = torch.exp(0.5 * logvar)
        self.var = torch.exp(logvar)

    def sample(self):
        return self.mean + self.std * torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)

    def mode(self):
        return self.mean


class LatentDiffusionCompat:
    """The inference surface of CompVis' `LatentDiffusion` over a kiln Pipeline."""

    def __init__(self, pipe: Pipeline, ema_weights: dict | None = None):
        self.pipe = pipe
        self.split_input_params = None  # set a CompVis dict to tile apply_model / decode_first_stage
        self.parameterization = pipe.cfg.parameterization
        self.scale_factor = pipe.cfg.scale_factor
        self.num_timesteps = pipe.cfg.timesteps
        ac = pipe.alphas_cumprod
        self.alphas_cumprod = ac.to(pipe.device)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1), ac[:-1]]).to(pipe.device)
        self.betas = (1 - ac / torch.cat([torch.ones(1), ac[:-1]])).to(pipe.device)
        self.sqrt_alphas_cumprod = ac.sqrt().to(pipe.device)
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt().to(pipe.device)
        self.use_ema = ema_weights is not None
        self._ema = ema_weights
        self._stored = None

    # -- attributes the scripts touch
    @property
    def device(self):
        return self.pipe.device

    @property
    def first_stage_model(self):
        return self.pipe.model.vae

    @property
    def cond_stage_model(self):
        return self.pipe.model.text_model

    @property
    def model(self):
        return self.pipe.model.unet

    def parameters(self):
        return self.pipe.model.parameters()

    def eval(self):
        return self

    def to(self, *_args, **_kw):
        return self

    cuda = half = to

    # -- EMA
    @contextlib.contextmanager
    def ema_scope(self, context=None):
        """Swap in the file's EMA UNet weights for the block and restore the others afterwards (LitEma's store,
        copy_to, restore); a no-op when the file has none."""
        if not self.use_ema:
            yield
            return
        unet = self.pipe.model.unet
        prefix = "model.diffusion_model."
        self._stored = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                v.copy_(self._ema[prefix + k])
        if context is not None:
            print(f"{context}: Switched to EMA weights")
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    v.copy_(self._stored[k])
            self._stored = None
            if context is not None:
                print(f"{context}: Restored training weights")

    # -- conditioning and first stage
    @torch.no_grad()
    def get_learned_conditioning(self, c):
        if isinstance(c, str):
            c = [c]
        return self.pipe.encode_prompts(list(c))

    @torch.no_grad()
    def encode_first_stage(self, x):
        mean, logvar = self.pipe.model.vae.encode(x.to(self.device, self.pipe.dtype))
        return DiagonalGaussianDistribution(mean, logvar)

    def get_first_stage_encoding(self, encoder_posterior):
        z = encoder_posterior.sample() if isinstance(encoder_posterior, DiagonalGaussianDistribution) \
            else encoder_posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        """`predict_cids`/`force_not_quantize` only concern VQ autoencoders; accepted and ignored for KL ones."""
        z = z.to(self.device, self.pipe.dtype) / self.scale_factor
        vae = self.pipe.model.vae
        p = self.split_input_params
        if p and p.get("patch_distributed_vq", True):
            return tiled(vae.decode, z, uf=int(p.get("vqf", self.pipe.cfg.downscale)),
                         **from_split_input_params(p)).float()
        return vae.decode(z).float()

    @torch.no_grad()
    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """The UNet's output (ε, or v for v-models) for latents x_noisy at steps t; cond is the cross-attention
        context (a tensor, or CompVis' {'c_crossattn': [tensor]})."""
        if isinstance(cond, dict):
            cond = cond.get("c_crossattn", cond.get("c_concat"))
        if isinstance(cond, (list, tuple)):
            cond = torch.cat(list(cond), dim=1)
        unet, dtype = self.pipe.model.unet, self.pipe.dtype
        t = t.to(self.device)
        run = lambda z: unet(z.to(dtype), t, cond.to(dtype)).float()
        if self.split_input_params:
            return tiled(run, x_noisy, **from_split_input_params(self.split_input_params))
        return run(x_noisy)

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).to(x_start.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).to(x_start.dtype)
        return a * x_start + s * noise


def load_model_from_config(config=None, ckpt=None, verbose=False, *, device="auto", precision="auto",
                           ema="auto") -> LatentDiffusionCompat:
    """CompVis' `load_model_from_config(config, ckpt)`: `config` may be an OmegaConf/dict, a yaml path, or None
    (the architecture is read from the weights either way). The UNet holds the file's raw weights; `ema_scope()`
    swaps in its `model_ema.*` weights when it has them (ema="off" ignores them)."""
    from .checkpoints import load_ema_weights

    if ckpt is None:
        raise ValueError("load_model_from_config needs ckpt (a CompVis .ckpt/.safetensors file or diffusers folder)")
    yaml = str(config) if isinstance(config, (str, Path)) else None
    pipe = load(ckpt, device=device, precision=precision, ema="off", config=yaml)
    ema_weights = None if ema == "off" else load_ema_weights(ckpt, pipe.dtype, pipe.device)
    if verbose:
        print(f"Loaded {ckpt}" + (" (with EMA weights for ema_scope)" if ema_weights else ""))
    return LatentDiffusionCompat(pipe, ema_weights)


class _CompVisSampler:
    fn = None

    def __init__(self, model: LatentDiffusionCompat, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.steps, self.discretize = None, "uniform"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        """CompVis' `make_schedule`; `sample` calls it with the default "uniform", as CompVis does, so "quad" reaches
        img2img's `stochastic_encode`/`decode` after an explicit call."""
        if ddim_discretize not in ("uniform", "quad"):
            raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discretize}"')
        ts, a, a_prev, sigma = ddim_schedule(self.model.pipe.alphas_cumprod, ddim_num_steps, ddim_eta, ddim_discretize)
        self.steps, self.eta, self.discretize = ddim_num_steps, ddim_eta, ddim_discretize
        self.ddim_timesteps = ts
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = a, a_prev.numpy().astype(np.float64), sigma
        self.ddim_sqrt_one_minus_alphas = (1 - a).sqrt()
        if verbose:
            print(f"Selected timesteps for ddim sampler: {ts}")

    def _eps_fn(self, c, uc, scale, score_corrector, corrector_kwargs):
        m = self.model
        # One CFG implementation: the pipeline's; with split_input_params the UNet call is the tiled apply_model.
        tiled = None if m.split_input_params is None else m.apply_model
        base = m.pipe.eps_fn(c, uc if (uc is not None and scale != 1.0) else None, scale, unet_call=tiled)
        if score_corrector is None:
            return base

        def corrected(x, t):
            tt = torch.full((x.shape[0],), t, device=m.device, dtype=torch.long)
            return score_corrector.modify_score(m, base(x, t), x, tt, c, **(corrector_kwargs or {}))
        return corrected

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1., noise_dropout=0.,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None, **kwargs):
        """CompVis' `sample`: returns (samples, intermediates). `quantize_x0` concerns VQ models only (a no-op)."""
        if conditioning is not None and conditioning.shape[0] != batch_size:
            print(f"Warning: Got {conditioning.shape[0]} conditionings but batch-size is {batch_size}")
        if score_corrector is not None and self.model.parameterization != "eps":
            raise ValueError("score_corrector needs an eps-parameterized model")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.device
        size = (batch_size, *shape)
        x = torch.randn(size, device=device) if x_T is None else x_T.to(device).float()
        noise = lambda like: torch.randn(like.shape, device=like.device, dtype=like.dtype)
        known = None
        if mask is not None:
            if x0 is None:
                raise ValueError("mask needs x0")
            known = Known(mask.to(device).float(), x0.to(device).float(), self.model.pipe.alphas_cumprod.to(device),
                          noise)
        total = len(self.ddim_timesteps)
        inter = Intermediates(x, log_every_t, total)

        def step_cb(i, n, x_i, pred_x0):
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)

        eps = self._eps_fn(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                           score_corrector, corrector_kwargs)
        out = type(self).fn(eps, x, self.model.pipe.alphas_cumprod.to(device), S, eta=eta, noise=noise,
                            callback=step_cb, temperature=temperature, noise_dropout=noise_dropout, known=known,
                            intermediates=inter, discretize=self.discretize)
        return out, dict(inter)


class DDIMSampler(_CompVisSampler):
    fn = staticmethod(sample_ddim)

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """Noise x0 to the level of DDIM index t (img2img's z_enc); t indexes the sub-schedule of make_schedule."""
        if use_original_steps:
            a = self.model.sqrt_alphas_cumprod[t]
            s = self.model.sqrt_one_minus_alphas_cumprod[t]
        else:
            a = self.ddim_alphas.to(x0.device)[t].sqrt()
            s = self.ddim_sqrt_one_minus_alphas.to(x0.device)[t]
        noise = torch.randn_like(x0) if noise is None else noise
        return a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False):
        """Denoise from DDIM index t_start down (img2img), as CompVis: the first step uses index t_start − 1."""
        if use_original_steps:
            raise NotImplementedError("use_original_steps=True is not supported")
        eps = self._eps_fn(cond, unconditional_conditioning, unconditional_guidance_scale, None, None)
        noise = lambda like: torch.randn(like.shape, device=like.device, dtype=like.dtype)
        return sample_ddim(eps, x_latent.float(), self.model.pipe.alphas_cumprod.to(x_latent.device), self.steps,
                           eta=self.eta, noise=noise, start=t_start, discretize=self.discretize)


class PLMSSampler(_CompVisSampler):
    fn = staticmethod(sample_plms)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)


__all__ = ["load_model_from_config", "LatentDiffusionCompat", "DDIMSampler", "PLMSSampler",
           "DiagonalGaussianDistribution"]
