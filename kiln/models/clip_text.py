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
    # "clip": Hugging Face names (SD 1.x, SDXL's first encoder); "openclip": open_clip's (SD 2.x, bigG)
    kind: str = "clip"
    projection: int = 0  # width of OpenCLIP's `text_projection` (pooled output); 0 = none


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
        # Positions are always 0..n-1: some merged checkpoints carry a corrupted `position_ids` buffer, which is
        # therefore not used.
        return embed_tokens(self.token_embedding, ids, extra) + self.position_embedding.weight[: ids.shape[1]]


def embed_tokens(table: nn.Embedding, ids, extra=None):
    """Token vectors; ids past the vocabulary index `extra` (textual-inversion vectors)."""
    if extra is None:
        return table(ids)
    vocab = table.num_embeddings
    tokens = table(ids.clamp(max=vocab - 1))
    new = ids >= vocab
    tokens[new] = extra.to(tokens.dtype)[ids[new] - vocab]
    return tokens


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


# ---------------------------------------------------------------- open_clip's text tower (SD 2.x, SDXL's bigG)

class ResidualAttention(nn.Module):
    """open_clip's `nn.MultiheadAttention`: one fused `in_proj` for q, k, v."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = ResidualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.mlp_width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextTransformer(nn.Module):
    """open_clip's text tower under `cond_stage_model.model.` (SD 2.x) or `conditioner.embedders.1.model.` (SDXL),
    with the same `forward(ids, skip, final_norm, extra)` / `pooled(hidden, ids)` as `CLIPTextTransformer`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_position, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection or cfg.width))
        self.logit_scale = nn.Parameter(torch.empty(()))  # unused here (image–text contrast), but in every file

    @property
    def layers(self):
        return self.transformer.resblocks

    def forward(self, ids, skip: int = 0, final_norm: bool | None = None, extra=None):
        x = embed_tokens(self.token_embedding, ids, extra) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - skip]:
            x = block(x)
        if final_norm if final_norm is not None else skip == 0:
            x = self.ln_final(x)
        return x

    def hidden_and_pooled(self, ids, skip: int = 0, final_norm: bool | None = None, extra=None):
        """(`forward(ids, skip, final_norm)`, `pooled` of the last layer) in one pass (SDXL needs both)."""
        x = embed_tokens(self.token_embedding, ids, extra) + self.positional_embedding[: ids.shape[1]]
        keep, n = None, len(self.transformer.resblocks)
        for i, block in enumerate(self.transformer.resblocks):
            if i == n - skip:
                keep = x
            x = block(x)
        keep = x if skip == 0 else keep
        if final_norm if final_norm is not None else skip == 0:
            keep = self.ln_final(keep)
        return keep, self.pooled(self.ln_final(x), ids)

    def pooled(self, hidden, ids):
        """The end token's final-normed state projected by `text_projection` (SDXL's pooled text embedding).
        `hidden` must be the last layer's output after `ln_final`."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), ids.argmax(dim=-1)] @ self.text_projection


def text_transformer(cfg: CLIPTextConfig) -> nn.Module:
    return OpenCLIPTextTransformer(cfg) if cfg.kind == "openclip" else CLIPTextTransformer(cfg)
