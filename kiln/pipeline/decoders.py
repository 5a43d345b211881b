"""Tiny decoders (TAESD, `kiln.checkpoints.taesd`) beside the model's VAE: the final decode of a generation that
asks for one (`GenerationParams.decoder`), and the live previews when the pipeline has a preview decoder.

A decoder is named by its file, or as A1111 names the choice (`sd_vae_decode_method` "TAESD"): the model family's
`taesd_decoder.*` / `taesdxl_decoder.*` in the pipeline's `vae_approx_dir` (A1111's `models/VAE-approx`). Files are
loaded once per pipeline, on its device and in its precision, and checked against the model's latent space."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..checkpoints.taesd import TinyAutoencoder, describe_family, load_taesd
from ..errors import KilnError
from .vae import to_uint8

APPROX_DIR = "models/VAE-approx"  # A1111's folder for them, relative to where kiln runs
TAESD = "TAESD"  # A1111's name for "the model's TAESD" (sd_vae_decode_method, the "VAE Decoder" infotext)
APPROX_NAMES = {"sd": "taesd_decoder", "sdxl": "taesdxl_decoder"}  # A1111's file names per latent space
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def latent_family(cfg) -> str:
    """The latent space a model samples in, as TAESD files are made for one: SD 1.x and 2.x share theirs."""
    return "sdxl" if cfg.is_sdxl else "sd"


def find_approx(folder, cfg) -> Path | None:
    """The model family's TAESD decoder in `folder` (A1111's names), or None."""
    if not folder or not Path(folder).is_dir():
        return None
    stem = APPROX_NAMES[latent_family(cfg)]
    return next((Path(folder) / (stem + s) for s in SUFFIXES if (Path(folder) / (stem + s)).is_file()), None)


def resolve(pipe, spec: str, what: str = "decoder") -> Path:
    if spec.upper() == TAESD:
        found = find_approx(pipe.vae_approx_dir, pipe.cfg)
        if found is None:
            stem = APPROX_NAMES[latent_family(pipe.cfg)]
            raise KilnError(f"{what} TAESD: no {stem}.safetensors or .pth in {pipe.vae_approx_dir or APPROX_DIR} "
                            "(madebyollin/taesd's files; or name the file)")
        return found
    return Path(spec)


def load_decoder(pipe, spec: str, what: str = "decoder") -> TinyAutoencoder:
    """The decoder `spec` names (a file, a diffusers AutoencoderTiny folder or TAESD), loaded once, checked."""
    path = resolve(pipe, spec, what)
    key = str(path.resolve())
    if key not in pipe.tiny_decoders:
        try:
            tiny = load_taesd(path, "decoder", dtype=pipe.dtype, device=pipe.device)
        except KilnError as e:
            raise KilnError(f"{what}: {e}") from None
        check_fits(tiny, pipe.cfg, what)
        pipe.tiny_decoders[key] = tiny
    return pipe.tiny_decoders[key]


def check_fits(tiny: TinyAutoencoder, cfg, what: str):
    """Refuse a decoder made for another latent space: by its channels, and by the family its name gives (the
    only way to tell TAESD from TAESDXL: their tensors have the same shapes)."""
    own = latent_family(cfg)
    if tiny.latent_channels != cfg.latent_channels or cfg.downscale != 8:
        raise KilnError(f"{what} {tiny.path}: decodes {tiny.latent_channels}-channel latents of "
                        f"{describe_family(tiny.family)}; this {cfg.family} model's have {cfg.latent_channels}")
    if tiny.family is not None and tiny.family != own:
        raise KilnError(f"{what} {tiny.path}: made for {describe_family(tiny.family)} latents, not this {cfg.family} "
                        f"model's (use {APPROX_NAMES[own]})")


@torch.no_grad()
def tiny_decode(tiny: TinyAutoencoder, z: torch.Tensor) -> torch.Tensor:
    """UNet latents → images in [-1, 1], fp32 (as `vae.decode_latents` gives them)."""
    p = next(tiny.module.parameters())
    x = tiny.module(z.to(p.device, p.dtype) / tiny.scale + tiny.shift)
    return x.float() * 2.0 - 1.0


def tiny_previews(tiny: TinyAutoencoder, latents: torch.Tensor) -> list:
    """Full-size previews of a batch's latents (PIL images)."""
    return [Image.fromarray(px) for px in to_uint8(tiny_decode(tiny, latents))]
