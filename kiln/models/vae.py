"""AutoencoderKL of CompVis' `ldm/modules/diffusionmodules/model.py` (the latent-diffusion first stage).

Attribute names follow the checkpoint keys under `first_stage_model.`.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .conv import Conv2d
from .unet import like_weights


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4

    @property
    def downscale(self):  # the `f` of the CLI: image pixels per latent pixel
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch, out_ch):
        super().__init__()
        self.norm1 = Normalize(ch)
        self.conv1 = Conv2d(ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        if ch != out_ch:
            self.nin_shortcut = Conv2d(ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v = Conv2d(ch, ch, 1), Conv2d(ch, ch, 1), Conv2d(ch, ch, 1)
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as CompVis


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    def __init__(self, blocks, attns):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch, res = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            blocks = [ResnetBlock(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = Level(blocks, attns)
            ch = out
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
                res //= 2
            self.down.append(level)
        self.mid = Mid(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downscale
        self.conv_in = Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        up = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            out = cfg.ch * mult
            blocks = [ResnetBlock(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = Level(blocks, attns)
            ch = out
            if i != 0:
                level.upsample = Upsample(ch)
                res *= 2
            up.insert(0, level)  # index = resolution level, as the checkpoint keys expect
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(ch)
        self.conv_out = Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        """Image in [-1, 1] → (mean, logvar) of the diagonal Gaussian posterior (logvar clamped as CompVis)."""
        mean, logvar = self.quant_conv(self.encoder(like_weights(x, self.encoder.conv_in))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latent → image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(like_weights(z, self.decoder.conv_in)))
