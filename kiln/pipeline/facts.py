"""`ModelFacts`: what a front end may know about a loaded model (to check requests and describe it), as plain
data: the same record in-process and across Ray, never the model itself."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelFacts:
    name: str  # the file's stem (or the diffusers folder's name)
    hash: str | None  # AutoV2 (the first 10 hex digits of the file's SHA-256), None when hashing is off
    native_size: int
    size_unit: int  # widths and heights are multiples of this
    clip_layers: int  # clip skip 1 … this (A1111's CLIP_stop_at_last_layers)
    context_widths: tuple  # the text encoders' widths (an embedding needs vectors of each)
    inpainting: bool  # a 9-channel UNet: needs a mask
    sampler_schedules: dict = field(default_factory=dict)  # the model's own default schedules
    watermark: str | None = None  # the invisible watermark's text
    taesd: bool = False  # its TAESD decoder is in the pipeline's vae_approx_dir (sd_vae_decode_method TAESD)

    @classmethod
    def of(cls, pipe) -> ModelFacts:
        from .decoders import find_approx

        cfg = pipe.cfg
        return cls(pipe.model_name, pipe.model_hash, pipe.native_size, max(8, cfg.downscale), cfg.text.layers,
                   tuple(cfg.context_widths), cfg.unet.in_channels != cfg.latent_channels,
                   dict(cfg.sampler_schedules), cfg.watermark, find_approx(pipe.vae_approx_dir, cfg) is not None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFacts:
        return cls(**{**d, "context_widths": tuple(d["context_widths"])})
