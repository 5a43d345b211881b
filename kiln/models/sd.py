"""The whole latent-diffusion model as one module whose state-dict keys are the CompVis checkpoint keys.

`LatentDiffusion(cfg).state_dict()` has exactly the keys `model.diffusion_model.*`, `first_stage_model.*`
and `cond_stage_model.transformer.text_model.*` of a CompVis SD v1 file (`cond_stage_model.model.*`, open_clip's
names, for SD 2.x), so loading is `load_state_dict`.
"""
from dataclasses import dataclass, field, asdict

import torch
from torch import nn

from .clip_text import CLIPTextConfig, CLIPTextTransformer, OpenCLIPTextTransformer
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig


# Linear latent → RGB map for SD v1 latents (the widely used "cheap approximation", as in A1111's live previews).
SD1_LATENT_RGB = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]


@dataclass(frozen=True)
class ModelConfig:
    family: str = "sd1"  # sd1 | sd1-inpaint | sd2 | sd2-inpaint ...
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    text_skip: int = 0  # text-encoder layers left out: SD 2.x and SDXL condition on the penultimate (1)
    text_final_norm: bool = True  # the final layer norm on that state (SD 1.x/2.x yes; SDXL no)
    text2: CLIPTextConfig | None = None  # SDXL base: OpenCLIP bigG beside CLIP ViT-L (contexts concatenated)
    scale_factor: float = 0.18215
    parameterization: str = "eps"  # eps | v
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    native_size: int = 512  # default H and W in pixels
    watermark: str = "StableDiffusionV1"
    # Cheap previews: scaled latent channels → RGB in [-1, 1], one row per channel then a bias row.
    # None: SD v1's published approximation (for 4-channel latents) or a grey of the channel mean.
    latent_rgb: tuple | None = None
    # Schedules this model's samplers take when a request names none, where they differ from the registry's
    # (kiln.samplers), e.g. {"plms": "quad"}. Real checkpoints carry none: they sample exactly as CompVis/A1111.
    sampler_schedules: dict = field(default_factory=dict)

    def latent_rgb_matrix(self) -> torch.Tensor:
        if self.latent_rgb is not None:
            return torch.tensor(self.latent_rgb, dtype=torch.float32)
        if self.latent_channels == 4:
            return torch.tensor(SD1_LATENT_RGB + [[0.0, 0.0, 0.0]])
        return torch.cat([torch.full((self.latent_channels, 3), 1.0 / self.latent_channels), torch.zeros(1, 3)])

    @property
    def is_sdxl(self) -> bool:
        return self.family.startswith("sdxl")

    @property
    def context_widths(self) -> list[int]:
        return [t.width for t in (self.text, self.text2) if t is not None]

    @property
    def latent_channels(self):
        return self.unet.out_channels

    @property
    def downscale(self):
        return self.vae.downscale

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        tup = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
        if d.get("latent_rgb") is not None:
            d["latent_rgb"] = tuple(tuple(r) for r in d["latent_rgb"])
        return cls(**{**d, "unet": UNetConfig(**tup(d["unet"])), "vae": VAEConfig(**tup(d["vae"])),
                      "text": CLIPTextConfig(**d["text"]),
                      "text2": CLIPTextConfig(**d["text2"]) if d.get("text2") else None})


def alphas_cumprod(cfg: ModelConfig) -> torch.Tensor:
    """ᾱ of the "scaled linear" schedule, computed in float64 and stored as float32 as CompVis does."""
    betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class _Holder(nn.Module):
    """An empty module that only carries named children, to spell out the checkpoint prefixes."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.model = _Holder(diffusion_model=UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        wrap = lambda t: (_Holder(model=OpenCLIPTextTransformer(t)) if t.kind == "openclip"
                          else _Holder(transformer=_Holder(text_model=CLIPTextTransformer(t))))
        if cfg.is_sdxl:  # `conditioner.embedders.N.`: base 0 = CLIP ViT-L, 1 = OpenCLIP bigG; refiner 0 = bigG
            self.conditioner = _Holder(embedders=nn.ModuleList(wrap(t) for t in (cfg.text, cfg.text2) if t))
        else:  # SD 1.x `cond_stage_model.transformer.text_model.*`; SD 2.x `cond_stage_model.model.*`
            self.cond_stage_model = wrap(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_model(self) -> CLIPTextTransformer | OpenCLIPTextTransformer:
        """The (first) text encoder."""
        return self.text_models[0]

    @property
    def text_models(self) -> list:
        holders = list(self.conditioner.embedders) if self.cfg.is_sdxl else [self.cond_stage_model]
        return [h.model if hasattr(h, "model") else h.transformer.text_model for h in holders]
