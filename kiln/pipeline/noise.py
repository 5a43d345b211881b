"""Seeds → start noise: one CPU generator per image, so an image is the same on every device and batch size."""
from __future__ import annotations

import torch


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(shape, gens, device, dtype=torch.float32):
    """One draw per image from that image's own CPU generator: identical on every device and batch size."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per image (each image's noise seen as one vector), as A1111's variation seeds."""
    fa, fb = a.flatten(1), b.flatten(1)
    dot = ((fa / fa.norm(dim=1, keepdim=True)) * (fb / fb.norm(dim=1, keepdim=True))).sum(1).clamp(-1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    wa = torch.where(so.abs() < 1e-6, 1 - t, torch.sin((1 - t) * omega) / so.clamp(min=1e-6))
    wb = torch.where(so.abs() < 1e-6, torch.full_like(so, t), torch.sin(t * omega) / so.clamp(min=1e-6))
    return wa.view(-1, *[1] * (a.dim() - 1)) * a + wb.view(-1, *[1] * (a.dim() - 1)) * b


def start_noise(shape, seeds, device, subseeds=None, subseed_strength: float = 0.0, resize_from=None):
    """(start latents, the images' generators). Plain: one draw per image from its seed. A1111's variations:
    `subseeds`/`subseed_strength` slerp towards other seeds' noise; `resize_from` = (h, w) in latent pixels draws
    the seed's noise at that size and centres it (cropped or surrounded by fresh noise), so an image keeps its
    composition at another size."""
    gens = generators(seeds)
    x = randn(shape, gens, "cpu")
    if not subseed_strength and resize_from is None:
        return x.to(device), gens
    small = shape if resize_from is None else (shape[0], *resize_from)
    noise = x if tuple(small) == tuple(shape) else randn(small, generators(seeds), "cpu")
    if subseed_strength:
        noise = slerp(subseed_strength, noise, randn(small, generators(subseeds), "cpu"))
    if tuple(small) == tuple(shape):
        return noise.to(device), gens
    dy, dx = (shape[1] - small[1]) // 2, (shape[2] - small[2]) // 2
    h, w = min(small[1], shape[1]), min(small[2], shape[2])
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    x = x.clone()
    x[:, :, ty:ty + h, tx:tx + w] = noise[:, :, sy:sy + h, sx:sx + w]
    return x.to(device), gens
