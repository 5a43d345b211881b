"""Autoencoder stage: pixels ↔ latents (whole or in tiles), and cheap latent previews."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..tiling import tiled_cover
from .noise import randn

TILES = ("auto", "on", "off")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] uint8, truncating as CompVis' scripts do."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    return (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or [H, W, 3]) → [B, 3, H, W] in [-1, 1]. (The strides of the result decide which
    convolution kernels the encoder runs, hence its last bits: one image is permuted first, then given its batch
    dimension.)"""
    x = torch.from_numpy(np.asarray(pixels))
    x = x.permute(2, 0, 1)[None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def tiled(pipe, tile: str, latent_hw) -> bool:
    """Tiles for the UNet and the VAE: `tile` "on", "off", or "auto" = when the latent is more than twice the
    model's native size on a side (beyond what it was trained for, and where memory grows)."""
    if tile == "on":
        return True
    if tile == "off":
        return False
    return max(latent_hw) > 2 * (pipe.native_size // pipe.cfg.downscale)


@torch.no_grad()
def decode_latents(pipe, z: torch.Tensor, tile: str = "auto", notices: list | None = None) -> torch.Tensor:
    """Latents → images in [-1, 1], fp32; re-decodes in fp32 if half precision overflowed. Under --medvram and
    --lowvram one image at a time (the decoder's activations are then most of the device memory)."""
    if pipe.offloader is not None and z.shape[0] > 1:
        return torch.cat([decode_latents(pipe, one, tile, notices) for one in z.split(1)])
    cfg, vae = pipe.cfg, pipe.model.vae
    dec = vae.decode
    if tiled(pipe, tile, z.shape[-2:]):  # tiles of twice the native size: the decoder's group norms see one tile
        ks = 2 * pipe.native_size // cfg.downscale
        dec = lambda t: tiled_cover(vae.decode, t, ks, ks * 3 // 4, uf=cfg.downscale)
    x = dec(z.to(pipe.dtype) / cfg.scale_factor)
    if not torch.isfinite(x).all() and pipe.dtype != torch.float32:
        (pipe.notices if notices is None else notices).append(
            "the VAE produced non-finite values in half precision; decoded in fp32 instead")
        vae.float()
        x = dec(z.float() / cfg.scale_factor)
        vae.to(pipe.dtype)
    return x.float()


@torch.no_grad()
def encode_images(pipe, x: torch.Tensor, gens=None, tile: str = "auto") -> torch.Tensor:
    """Images in [-1, 1] → scaled latents (posterior sample with per-image generators, or the mean). Large
    images are encoded in tiles (see `tiled`)."""
    f, vae = pipe.cfg.downscale, pipe.model.vae
    if tiled(pipe, tile, (x.shape[-2] // f, x.shape[-1] // f)):
        ks = 2 * pipe.native_size
        both = tiled_cover(lambda t: torch.cat(vae.encode(t), dim=1), x.to(pipe.device, pipe.dtype), ks,
                           ks * 3 // 4, df=f)
        mean, logvar = both.chunk(2, dim=1)
    else:
        mean, logvar = vae.encode(x.to(pipe.device, pipe.dtype))
    if gens is None:
        return mean * pipe.cfg.scale_factor
    std = torch.exp(0.5 * logvar)
    return (mean + std * randn(mean.shape[1:], gens, pipe.device, mean.dtype)) * pipe.cfg.scale_factor


def latent_preview(cfg, latents: torch.Tensor) -> list:
    """Cheap latent → RGB previews (a linear map of the latent channels, no VAE): latent-sized PIL images."""
    m = cfg.latent_rgb_matrix()
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), m[:-1]) + m[-1].view(1, 3, 1, 1)
    return [Image.fromarray(p) for p in to_uint8(rgb)]
