"""CLIP text transformer (OpenAI ViT-L/14 layout, as Hugging Face's CLIPTextModel names it).

Attribute names follow the checkpoint keys under `cond_stage_model.transformer.text_model.`,
so a state dict loads without a key map.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP bigG/H use "gelu"
    eps: float = 1e-5


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_position, cfg.width)

    def forward(self, ids, extra=None):
        # Positions are always 0..n-1: some merged checkpoints carry a corrupted `position_ids` buffer, so it is not used.
        if extra is None:
            tokens = self.token_embedding(ids)
        else:  # ids past the vocabulary index `extra` (textual-inversion vectors)
            vocab = self.token_embedding.num_embeddings
            tokens = self.token_embedding(ids.clamp(max=vocab - 1))
            new = ids >= vocab
            tokens[new] = extra.to(tokens.dtype)[ids[new] - vocab]
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, causal) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """`forward(ids, skip=0)` returns the final-layer-normed last hidden state (skip=0), or the hidden state
    `skip` layers before the last, *without* the final layer norm (skip=1 is SDXL's penultimate state).
    A1111's clip-skip applies the final norm to the earlier state; use `forward(..., skip, final_norm=True)`."""

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids, skip: int = 0, final_norm: bool | None = None, extra=None):
        x = self.embeddings(ids, extra)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip]:
            x = layer(x)
        if final_norm if final_norm is not None else skip == 0:
            x = self.final_layer_norm(x)
        return x

    def pooled(self, hidden, ids):
        """Hidden state at the end token (the highest id in each row, as CLIP defines it)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), ids.argmax(dim=-1)]
