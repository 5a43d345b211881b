"""SwinIR (Liang et al. 2021) under its own tensor names: `conv_first`, `patch_embed.norm`, `layers.i` (residual Swin
transformer blocks: `residual_group.blocks.j` and a `conv`), `norm`, `conv_after_body`, then the reconstruction
the file's upsampler implies: "pixelshuffle" (classical SR: `conv_before_upsample`, `upsample.N`, `conv_last`),
"pixelshuffledirect" (lightweight SR: `upsample.0` alone), "nearest+conv" (real-world SR: `conv_up1..3`, `conv_hr`,
`conv_last`), or none (1× denoising / JPEG models: `conv_last` adds a residual to the input).

Attention runs through scaled_dot_product_attention with the relative-position bias (and the shifted windows' mask)
as its additive mask; both are derived here, so the files' `relative_position_index` and `attn_mask` buffers (the
latter only valid for the training image size) are not needed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import SRModule, pad_to
from .swin_common import Upsample, UpsampleOneStep, relative_position_index, shift_mask, unwindows, windows

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, subtracted from the input as SwinIR was trained


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window, window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def bias(self) -> torch.Tensor:
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B·nW, N, C]; mask: [nW, N, N] or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        add = self.bias().unsqueeze(0)  # [1, heads, N, N]
        if mask is not None:
            nw = mask.shape[0]
            add = (add.unsqueeze(0) + mask[None, :, None]).expand(bw // nw, -1, -1, -1, -1).reshape(bw, -1, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(windows(y, self.window, self.window), mask if self.shift else None)
        y = unwindows(y, self.window, self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_hidden: int):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_hidden)
                                    for i in range(depth))


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing each residual group and the body: one 3×3 ("1conv"), or a narrow 3-conv bottleneck."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    q = dim // 4
    return nn.Sequential(nn.Conv2d(dim, q, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(q, q, 1),
                         nn.LeakyReLU(0.2, True), nn.Conv2d(q, dim, 3, 1, 1))


class RSTB(nn.Module):
    """Residual Swin transformer block: `depth` blocks on tokens, a conv on the image, a residual around both."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_hidden: int, resi: str):
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, heads, window, mlp_hidden)
        self.conv = residual_conv(dim, resi)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, size, mask)
        b, _, c = x.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *size))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Holds the LayerNorm applied to the tokens after the first conv (`patch_embed.norm`)."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None


class SwinIR(SRModule):
    arch = "SwinIR"
    supports_half = False

    def __init__(self, *, in_nc: int = 3, dim: int = 96, depths=(6, 6, 6, 6), heads=(6, 6, 6, 6), window: int = 8,
                 mlp_hidden: int = 192, upscale: int = 2, upsampler: str = "", resi: str = "1conv",
                 unshuffle: int = 1, nf: int = 64, patch_norm: bool = True, img_range: float = 1.0):
        super().__init__(upscale // unshuffle, in_nc, in_nc)
        self.upscale, self.upsampler, self.window, self.unshuffle = upscale, upsampler, window, unshuffle
        self.img_range = img_range
        self.minimum, self.multiple = 16, unshuffle * unshuffle  # spandrel's size requirements for SwinIR
        mean = torch.tensor(RGB_MEAN if in_nc == 3 else (0.0,) * in_nc, device="cpu").view(1, in_nc, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        first = nn.Conv2d(in_nc * unshuffle**2, dim, 3, 1, 1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(unshuffle), first) if unshuffle > 1 else first
        self.patch_embed = PatchEmbed(dim, patch_norm)
        self.layers = nn.ModuleList(RSTB(dim, d, h, window, mlp_hidden, resi) for d, h in zip(depths, heads))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, resi)
        if upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU(0.01, True))
        if upsampler == "pixelshuffle":
            self.upsample = Upsample(upscale, nf)
        elif upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, dim, in_nc)
        elif upsampler == "nearest+conv":
            self.ups = upscale.bit_length() - 1  # doublings
            for i in range(self.ups):
                setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        if upsampler != "pixelshuffledirect":
            self.conv_last = nn.Conv2d(nf if upsampler else dim, in_nc, 3, 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer body on [B, C, H, W] features (H, W multiples of the window): same shape out."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        if self.patch_embed.norm is not None:
            tokens = self.patch_embed.norm(tokens)
        mask = None
        if any(len(layer.residual_group.blocks) > 1 for layer in self.layers):
            mask = shift_mask(h, w, self.window, self.window, self.window // 2, self.window // 2, x.device)
        for layer in self.layers:
            tokens = layer(tokens, (h, w), mask)
        return self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        lrelu = lambda t: F.leaky_relu(t, 0.2, inplace=True)
        if self.upsampler == "pixelshuffle":
            return self.conv_last(self.upsample(self.conv_before_upsample(x)))
        if self.upsampler == "pixelshuffledirect":
            return self.upsample(x)
        x = self.conv_before_upsample(x)
        for i in range(self.ups):
            x = lrelu(getattr(self, f"conv_up{i + 1}")(F.interpolate(x, scale_factor=2, mode="nearest")))
        return self.conv_last(lrelu(self.conv_hr(x)))

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # the windows tile the features: reflect-pad the input to whole windows (after the unshuffle's folding)
        x = pad_to(x, self.window * self.unshuffle)
        x = (x - self.mean.to(x.dtype)) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.features(feat)) + feat
        out = x + self.conv_last(feat) if not self.upsampler else self.reconstruct(feat)
        out = out / self.img_range + self.mean.to(x.dtype)
        return out[..., : h * self.scale, : w * self.scale]
