"""Test helpers: random TAESD weights (calibrated so that decoded pixels vary around mid-grey at unit scale: a wrong
tensor or layout shows in every pixel), written in each layout kiln reads, and diffusers' `AutoencoderTiny` with the
same weights as the reference."""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.models.taesd import TAESDDecoder, TAESDEncoder


def random_part(part: str = "decoder", latent_channels: int = 4, seed: int = 0) -> dict:
    """Published-layout tensors: convolutions ~ 1/sqrt(fan_in), small biases; the decoder's last convolution scaled
    so that pixels of N(0, 1) latents have std 0.25 around 0.5 (the encoder's: latents of std 1)."""
    module = (TAESDDecoder if part == "decoder" else TAESDEncoder)(latent_channels)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in module.state_dict().items():
        x = torch.randn(v.shape, generator=gen)
        state[k] = x * 0.05 if v.ndim == 1 else x * (v[0].numel() ** -0.5)
    module.load_state_dict(state)
    last = f"{len(module) - 1}"
    with torch.no_grad():
        x = (torch.randn(2, latent_channels, 8, 8, generator=gen) if part == "decoder"
             else torch.rand(2, 3, 64, 64, generator=gen))
        y = module(x)
    scale = (0.25 if part == "decoder" else 1.0) / y.std()
    state[last + ".weight"] = state[last + ".weight"] * scale
    state[last + ".bias"] = state[last + ".bias"] * scale + (0.5 - y.mean() * scale if part == "decoder" else 0.0)
    return state


def diffusers_tiny(decoder: dict, encoder: dict | None = None):
    """diffusers' AutoencoderTiny holding these published-layout tensors (the decoder's module N is diffusers'
    `decoder.layers.N-1`)."""
    from diffusers import AutoencoderTiny

    channels = decoder["1.weight"].shape[1]
    ref = AutoencoderTiny(latent_channels=channels).eval()
    state = ref.state_dict()
    for k, v in decoder.items():
        index, _, rest = k.partition(".")
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    for k, v in (encoder or {}).items():
        state[f"encoder.layers.{k}"] = v
    ref.load_state_dict(state)
    return ref


def write_layouts(root: Path, decoder: dict, stem: str = "taesd", encoder: dict | None = None) -> dict:
    """{"pth", "safetensors", "diffusers"}: the decoder as madebyollin publishes it (`{stem}_decoder.pth` written by
    torch.save, `.safetensors`) and as a diffusers folder named `{stem}` (written by `save_pretrained`)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    files = {"pth": root / f"{stem}_decoder.pth", "safetensors": root / f"{stem}_decoder.safetensors",
             "diffusers": root / stem}
    torch.save(decoder, files["pth"])
    save_file(decoder, str(files["safetensors"]))
    diffusers_tiny(decoder, encoder).save_pretrained(str(files["diffusers"]))
    return files
