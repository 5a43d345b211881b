"""The NSFW safety checker of the CompVis scripts (`StableDiffusionSafetyChecker`): CLIP ViT-L/14 vision tower,
visual projection, and cosine similarity to 17 concept and 3 "special care" embeddings with fixed thresholds.

Attribute names follow the checkpoint keys (`vision_model.vision_model.*`, `visual_projection.weight`,
`concept_embeds`, `special_care_embeds`, `concept_embeds_weights`, `special_care_embeds_weights`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip_text import Encoder


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    act: str = "quick_gelu"
    eps: float = 1e-5
    projection_dim: int = 768
    concepts: int = 17
    special: int = 3


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight[: x.shape[1] + 1]


class CLIPVisionTransformer(nn.Module):
    """Returns the pooled output: the class token after the post-layernorm."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: the checkpoint's spelling
        self.encoder = Encoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class _Holder(nn.Module):
    pass


class SafetyChecker(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.cfg = cfg
        self.vision_model = _Holder()
        self.vision_model.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(cfg.concepts, cfg.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(cfg.special, cfg.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(cfg.concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(cfg.special), requires_grad=False)

    @torch.no_grad()
    def forward(self, clip_pixels):
        """CLIP-normalised [B, 3, 224, 224] → (flagged [B] bool, concept scores [B, 17], special scores [B, 3]).

        A score is cosine similarity minus the concept's threshold; an image is flagged when any concept score is
        > 0. Any special-care hit adds 0.01 to every concept score (a stricter check for that image)."""
        emb = self.visual_projection(self.vision_model.vision_model(clip_pixels)).float()
        emb = F.normalize(emb, dim=-1)
        special = (emb @ F.normalize(self.special_care_embeds.float(), dim=-1).T
                   - self.special_care_embeds_weights.float())
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * 0.01
        concepts = (emb @ F.normalize(self.concept_embeds.float(), dim=-1).T
                    - self.concept_embeds_weights.float() + adjustment)
        return (concepts > 0).any(dim=1), concepts, special
