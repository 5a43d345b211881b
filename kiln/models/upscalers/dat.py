"""DAT, the Dual Aggregation Transformer (Chen et al. 2023: DAT, DAT-S, DAT-2, DAT-light) under its own tensor names:
`conv_first`, `before_RG.1` (a LayerNorm on the tokens), `layers.i` (residual groups: `blocks.j`, `conv`), `norm`,
`conv_after_body`, then "pixelshuffle" (`conv_before_upsample`, `upsample.N`, `conv_last`) or "pixelshuffledirect"
(`upsample.0`, DAT-light).

Blocks alternate between spatial window attention (even blocks: half the channels in `split`-sized windows, half in
the transposed windows; some blocks shift them) and channel attention (odd blocks: heads attend across channels),
each with a depth-wise conv branch and the two "interaction" gates between the branches. The files' derived buffers
(`rpe_biases`, `relative_position_index`, `attn_mask_0/1`) are computed here, not loaded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import SRModule
from .swin_common import Upsample, UpsampleOneStep, relative_position_index, shift_mask, unwindows, windows
from .swinir import RGB_MEAN, residual_conv


def image(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H·W, C] tokens → [B, C, H, W]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def tokens(img: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C]."""
    return img.flatten(2).transpose(1, 2)


class SpatialGate(nn.Module):
    """The feed-forward's gate: half the hidden channels, normalised and depth-wise convolved, gate the other half."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1, groups=ch)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * tokens(self.conv(image(self.norm(x2), h, w)))


class SGFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x)), h, w))


def _pos_layer(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cin), nn.ReLU(inplace=True), nn.Linear(cin, cout))


class DynamicPosBias(nn.Module):
    """An MLP from relative offsets (dy, dx) to one bias per head (DAT's position bias; not the residual variant)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        p = dim // 4
        self.pos_proj = nn.Linear(2, p)
        self.pos1, self.pos2, self.pos3 = _pos_layer(p, p), _pos_layer(p, p), _pos_layer(p, heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class SpatialAttention(nn.Module):
    """Attention within (wh × ww) windows over `dim` channels; its relative-position bias from DynamicPosBias."""

    def __init__(self, dim: int, heads: int, wh: int, ww: int):
        super().__init__()
        self.heads, self.wh, self.ww = heads, wh, ww
        self.pos = DynamicPosBias(dim // 4, heads)
        offsets = torch.stack(torch.meshgrid(torch.arange(1 - wh, wh, device="cpu"),
                                             torch.arange(1 - ww, ww, device="cpu"), indexing="ij"))
        self.register_buffer("rpe_biases", offsets.flatten(1).t().float(), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv: [B, H, W, 3, c] (H, W multiples of the window) → [B, H, W, c]."""
        _, h, w, _, c = qkv.shape
        n = self.wh * self.ww
        q, k, v = (windows(t, self.wh, self.ww).view(-1, n, self.heads, c // self.heads).transpose(1, 2)
                   for t in qkv.unbind(3))
        bias = self.pos(self.rpe_biases.to(qkv.dtype))[self.relative_position_index.view(-1)]
        add = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # [1, heads, N, N]
        if mask is not None:
            nw = mask.shape[0]
            add = (add.unsqueeze(0) + mask[None, :, None]).expand(q.shape[0] // nw, -1, -1, -1, -1)
            add = add.reshape(q.shape[0], self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype))
        return unwindows(out.transpose(1, 2).reshape(-1, n, c), self.wh, self.ww, h, w)


def _dw_branch(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())


def _channel_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8), nn.GELU(),
                         nn.Conv2d(dim // 8, dim, 1))


def _spatial_gate(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(),
                         nn.Conv2d(dim // 16, 1, 1))


class AdaptiveSpatialAttention(nn.Module):
    """Half the channels attend in (s0 × s1) windows, half in (s1 × s0); `shifted` blocks roll the windows by half."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], qkv_bias: bool, shifted: bool):
        super().__init__()
        self.split, self.shifted = split, shifted
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        s0, s1 = split
        self.attns = nn.ModuleList([SpatialAttention(dim // 2, heads // 2, s0, s1),
                                    SpatialAttention(dim // 2, heads // 2, s1, s0)])
        self.dwconv = _dw_branch(dim)
        self.channel_interaction = _channel_gate(dim)
        self.spatial_interaction = _spatial_gate(dim)

    def branch(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        attn = self.attns[i]
        if not self.shifted:
            return attn(qkv, None)
        sh, sw = attn.wh // 2, attn.ww // 2
        mask = shift_mask(qkv.shape[1], qkv.shape[2], attn.wh, attn.ww, sh, sw, qkv.device)
        out = attn(torch.roll(qkv, (-sh, -sw), dims=(1, 2)), mask)
        return torch.roll(out, (sh, sw), dims=(1, 2))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)
        v = image(qkv[..., 2 * c:], h, w)
        # both window shapes tile a square of the larger side; the padded positions hold zero q, k and v (as trained)
        m = max(self.split)
        qkv = F.pad(qkv.view(b, h, w, 3 * c), (0, 0, 0, -w % m, 0, -h % m)).view(b, h - h % -m, w - w % -m, 3, c)
        halves = [self.branch(i, qkv[..., i * c // 2:(i + 1) * c // 2]) for i in range(2)]
        attended = torch.cat(halves, dim=-1)[:, :h, :w].reshape(b, n, c)
        conv = self.dwconv(v)
        channel = self.channel_interaction(conv).view(b, 1, c)
        spatial = self.spatial_interaction(image(attended, h, w))
        return self.proj(attended * torch.sigmoid(channel) + tokens(torch.sigmoid(spatial) * conv))


class AdaptiveChannelAttention(nn.Module):
    """Each head attends across its channels (cosine similarity × a learnt temperature)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv = _dw_branch(dim)
        self.channel_interaction = _channel_gate(dim)
        self.spatial_interaction = _spatial_gate(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)  # [B, heads, d, N]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        attended = (attn @ v).reshape(b, c, n)  # channel-major: an image
        conv = self.dwconv(v.reshape(b, c, h, w))
        channel = self.channel_interaction(attended.view(b, c, h, w))
        spatial = self.spatial_interaction(conv).view(b, n, 1)
        return self.proj(attended.transpose(1, 2) * torch.sigmoid(spatial) + tokens(conv * torch.sigmoid(channel)))


class DATB(nn.Module):
    def __init__(self, dim: int, heads: int, split, hidden: int, qkv_bias: bool, group: int, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if index % 2 == 0:
            # DAT's schedule of shifted windows: blocks 2, 6, 10... of even groups, 0, 4, 8... of odd ones
            shifted = (index % 4 == 2) if group % 2 == 0 else (index % 4 == 0)
            self.attn = AdaptiveSpatialAttention(dim, heads, split, qkv_bias, shifted)
        else:
            self.attn = AdaptiveChannelAttention(dim, heads, qkv_bias)
        self.ffn = SGFN(dim, hidden)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class ResidualGroup(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, split, hidden: int, qkv_bias: bool, resi: str, group: int):
        super().__init__()
        self.blocks = nn.ModuleList(DATB(dim, heads, split, hidden, qkv_bias, group, j) for j in range(depth))
        self.conv = residual_conv(dim, resi)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, h, w)
        return x + tokens(self.conv(image(y, h, w)))


class DAT(SRModule):
    arch = "DAT"
    supports_half = False
    minimum = 16  # spandrel's size requirement for DAT (the windows pad themselves)

    def __init__(self, *, in_nc: int = 3, dim: int = 180, depths=(6, 6, 6, 6, 6, 6), heads=(6, 6, 6, 6, 6, 6),
                 split=(8, 32), hidden: int = 360, qkv_bias: bool = True, upscale: int = 4,
                 upsampler: str = "pixelshuffle", resi: str = "1conv", nf: int = 64):
        super().__init__(upscale, in_nc, in_nc)
        self.upsampler = upsampler
        mean = torch.tensor(RGB_MEAN if in_nc == 3 else (0.0,) * in_nc, device="cpu").view(1, in_nc, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.conv_first = nn.Conv2d(in_nc, dim, 3, 1, 1)
        self.before_RG = nn.Sequential(nn.Identity(), nn.LayerNorm(dim))  # [0] was a rearrange to tokens
        self.layers = nn.ModuleList(ResidualGroup(dim, d, h, tuple(split), hidden, qkv_bias, resi, i)
                                    for i, (d, h) in enumerate(zip(depths, heads)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, resi)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU(0.01, True))
            self.upsample = Upsample(upscale, nf)
            self.conv_last = nn.Conv2d(nf, in_nc, 3, 1, 1)
        else:
            self.upsample = UpsampleOneStep(upscale, dim, in_nc)

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        feat = self.conv_first(x - mean)
        t = self.before_RG[1](tokens(feat))
        for layer in self.layers:
            t = layer(t, h, w)
        feat = self.conv_after_body(image(self.norm(t), h, w)) + feat
        if self.upsampler == "pixelshuffle":
            return self.conv_last(self.upsample(self.conv_before_upsample(feat))) + mean
        return self.upsample(feat) + mean
