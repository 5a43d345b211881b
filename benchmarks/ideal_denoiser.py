"""DDIM and PLMS at 20 steps with the *ideal* denoiser of the shapes data instead of a trained UNet: is PLMS'
failure at scale 5 (docs/samplers.md) a property of the data and of guidance, or of the trained model?

The ideal denoiser is the exact posterior mean E[z0 | z_t] over a finite set of encoded images (the shipped
autoencoder's latents): unconditional over N training images, conditional over K fresh renderings of each held-out
prompt's labels (its only freedom is the ±2 px jitter). Guidance combines the two as classifier-free guidance does.
No network is involved in denoising, so whatever fails here fails for any model that learns the data exactly.

    python benchmarks/ideal_denoiser.py [--images 20000] [--per-prompt 64] [--scales 1,2,5]

Prints, per sampler and scale, the pixel analyzer's accuracies on the 44 held-out prompts and the std of pred_x0
every third step (a growing std is the overshoot that ends in color noise).
"""
import argparse

import numpy as np
import torch

import kiln
from kiln.demo import shapes
from kiln.demo.evaluate import score
from kiln.demo.report import EMBEDDED
from kiln.demo.train import to_float
from kiln.pipeline import to_uint8
from kiln.samplers.compvis import sample_ddim, sample_plms


def posterior_mean(x, z, a):
    """E[z0 | x] for x = √a·z0 + √(1−a)·ε with z0 uniform over the rows of z ((N, D) shared, or (B, K, D))."""
    d2 = torch.cdist(x, a ** 0.5 * z) ** 2 if z.dim() == 2 else ((x[:, None] - a ** 0.5 * z) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
    return w @ z if z.dim() == 2 else (w[..., None] * z).sum(1)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="training images for the unconditional set")
    ap.add_argument("--per-prompt", type=int, default=64, help="renderings per held-out prompt (conditional set)")
    ap.add_argument("--scales", default="1,2,5")
    args = ap.parse_args()

    pipe = kiln.load(EMBEDDED, device="cpu", precision="full")
    ac = pipe.alphas_cumprod

    def encode(images):  # uint8 HWC images → flattened latent means, in chunks (20,000 at once is several GB)
        chunks = (torch.from_numpy(np.stack(images[i:i + 256])).permute(0, 3, 1, 2) for i in range(0, len(images), 256))
        return torch.cat([pipe.encode_images(to_float(c)) for c in chunks]).flatten(1)

    prompts = shapes.heldout_prompts()
    uncond = encode([image for image, _, _ in shapes.sample(args.images, seed=0, split="train")])
    rng = np.random.default_rng(1)
    cond = torch.stack([encode([shapes.render(labels, rng) for _ in range(args.per_prompt)]) for _, labels in prompts])

    def guided_eps(scale):
        def eps(x, t):
            a, flat = float(ac[t]), x.flatten(1)
            du, dc = posterior_mean(flat, uncond, a), posterior_mean(flat, cond, a)
            return ((flat - a ** 0.5 * (du + scale * (dc - du))) / (1 - a) ** 0.5).view_as(x)
        return eps

    start = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    print(f"ideal denoiser: {args.images} training latents, {args.per_prompt} per held-out prompt; 20 steps")
    print("| sampler | scale | color | background | shape | position | size | pred_x0 std, every 3rd step |")
    print("|---|---|---|---|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        for name, sample in (("ddim", sample_ddim), ("plms", sample_plms)):
            stds = []
            z = sample(guided_eps(scale), start.clone(), ac, 20,
                       callback=lambda i, n, x, x0, stds=stds: stds.append(float(x0.std())))
            pixels = to_uint8(pipe.decode_latents(z))
            r = score([(p, labels) for p, (_, labels) in zip(pixels, prompts)])
            print(f"| {name} | {scale:g} | " + " | ".join(f"{100 * r[k]:.1f}%" for k in
                  ("color", "background", "shape", "position", "size")) + " | "
                  + " ".join(f"{s:.2f}" for s in stds[::3]) + " |", flush=True)


if __name__ == "__main__":
    main()
