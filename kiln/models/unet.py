"""The latent-diffusion UNet of CompVis' `openaimodel.py` with `SpatialTransformer` cross-attention.

Attribute names follow the checkpoint keys under `model.diffusion_model.`. One config covers SD 1.x
(8 heads, conv proj, context 768), SD 2.x (64-channel heads, linear proj, context 1024), inpainting
(9 input channels) and SDXL (per-level transformer depth, `label_emb` vector conditioning).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Conv2d, Linear


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1  # SD 2.x / SDXL: 64 (heads = channels // 64)
    transformer_depth: int | tuple[int, ...] = 1  # SDXL: one depth per level
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL vector conditioning width (2816)
    upcast_attention: bool = False  # compute attention in fp32 under fp16 (SD 2.1)

    def depth(self, level):
        d = self.transformer_depth
        return d[level] if isinstance(d, (tuple, list)) else d


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as CompVis does (keeps fp16 runs stable)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def like_weights(x, conv: Conv2d):
    """`x` in the memory format of the model's convolutions: channels-last when the weights are (the pipeline sets
    that on CPUs and CUDA, where oneDNN and cuDNN run NHWC convolutions faster); a no-op otherwise."""
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def norm32(ch):
    return GroupNorm32(32, ch, eps=1e-5)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding, cos first (CompVis `util.timestep_embedding`); t may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch):
        super().__init__()
        self.in_layers = nn.Sequential(norm32(ch), nn.SiLU(), Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(norm32(out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    slice_size: int | None = None  # queries per attention call (`Pipeline.attention_slicing`); None: all at once

    def __init__(self, query_dim, context_dim, heads, dim_head, upcast=False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.slice_size and n > self.slice_size:  # bounded memory where SDPA falls back to the N² kernel
            out = torch.cat([self.attend(q[:, :, i:i + self.slice_size], k, v) for i in range(0, n, self.slice_size)],
                            dim=2)
        else:
            out = self.attend(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def attend(self, q, k, v):
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).type(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim, upcast):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, dim_head, depth, context_dim, linear, upcast):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = Linear(ch, inner) if linear else Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth))
        self.proj_out = Linear(inner, ch) if linear else Conv2d(inner, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # `size` (the next skip's size) lets latents that are not a multiple of 8 work, as diffusers allows.
        up = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(up)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def build_encoder(m: nn.Module, cfg: UNetConfig):
    """The UNet's time (and label) embedding, input blocks and middle block, set on `m` under the checkpoint's
    names: shared by the UNet and a ControlNet, its trainable copy. Returns (the skips' channels, the channels
    after the middle block, the downsampling factor there, the attention-block factory)."""
    mc = cfg.model_channels
    emb_ch = mc * 4
    m.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    if cfg.adm_in_channels is not None:
        m.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))

    def attention(ch, level):
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        return SpatialTransformer(ch, heads, dim_head, cfg.depth(level), cfg.context_dim,
                                  cfg.use_linear_in_transformer, cfg.upcast_attention)

    m.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb_ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(attention(ch, level))
            m.input_blocks.append(TimestepEmbedSequential(*layers))
            skip_chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            m.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_chans.append(ch)
            ds *= 2
    last = len(cfg.channel_mult) - 1
    m.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch), attention(ch, last), ResBlock(ch, emb_ch, ch))
    return skip_chans, ch, ds, attention


def embed(m: nn.Module, cfg: UNetConfig, t, y, dtype):
    """The timestep (and SDXL's vector) embedding of a UNet or ControlNet built by `build_encoder`."""
    emb = m.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype))
    if cfg.adm_in_channels is not None:
        emb = emb + m.label_emb(y.to(dtype))
    return emb


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = mc * 4
        skip_chans, ch, ds, attention = build_encoder(self, cfg)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(norm32(ch), nn.SiLU(), Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self):
        return self.time_embed[0].weight.dtype

    def forward(self, x, t, context, y=None, cache: "FeatureCache | None" = None, control=None):
        """x: [B, C, h, w] latents; t: [B] timesteps (may be fractional); context: [B, n, context_dim];
        y: [B, adm_in_channels] vector conditioning (SDXL only); cache: DeepCache-style feature reuse;
        control: ControlNet residuals (one per input block, then the middle block's), added to the skips and to
        the middle block's output."""
        emb = embed(self, self.cfg, t, y, self.dtype)
        h = like_weights(x.to(self.dtype), self.input_blocks[0][0])
        context = context.to(self.dtype)
        reuse = cache is not None and cache.reuse(h)
        shallow = len(self.output_blocks) - cache.depth if cache is not None else None
        hs = []
        for block in self.input_blocks[:cache.depth] if reuse else self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        if reuse:
            h = cache.h
        else:
            h = self.middle_block(h, emb, context)
            if control is not None:
                h = h + control[-1]
        for i, block in enumerate(self.output_blocks):
            if reuse and i < shallow:
                continue
            if i == shallow:
                cache.h = h  # what the deep part hands to the last `depth` output blocks
            skip = hs.pop()
            if control is not None:
                skip = skip + control[len(hs)]
            h = block(torch.cat([h, skip], dim=1), emb, context, hs[-1].shape[-2:] if hs else None)
        return self.out(h).to(x.dtype)


class FeatureCache:
    """DeepCache-style feature reuse (Ma et al., 2023): the deep part of the UNet changes slowly from step to step.
    Every `interval`-th call runs the whole UNet and keeps the feature that enters its last `depth` output blocks;
    the calls between run only the first `depth` input blocks (for their skips) and those output blocks on the
    kept feature. One cache per sampling run; off by default (it changes the image)."""

    def __init__(self, interval: int, depth: int):
        self.interval, self.depth, self.calls, self.h = interval, depth, 0, None

    def reuse(self, x) -> bool:
        ok = self.h is not None and self.calls % self.interval != 0 and self.h.shape[0] == x.shape[0]
        self.calls += 1
        return ok
