"""Where PLMS loses stability on a model: its adherence with the Adams–Bashforth order capped (everywhere, or in a
window of steps), on CompVis' uniform and quad timesteps, and the guided denoiser's stiffness μ along a DDIM path.

    python benchmarks/plms_stability.py [--ckpt kiln/assets/demo.safetensors] [--scale 5] [--steps 20]
    python benchmarks/plms_stability.py --texture 0.1,0.2,0.3   (PLMS on the model as if its data had texture)

PLMS's step from t to t' is a DDIM step taken with a combination of the current and up to three earlier ε. In
(x/√ᾱ, σ) a DDIM step is an Euler step of relative size z = (σ_t' − σ_t)/σ_t; linearised, the error grows by the
eigenvalues of I − ∂D/∂(x/√ᾱ) (μ; an exact posterior mean D has μ ≤ 1). 4-step Adams–Bashforth is stable on the
real axis for |z·μ| up to about 0.3, 3-step up to 0.55, 2-step up to 1. Measured on the shipped demo model
(docs/samplers.md): capped at order 3 PLMS passes the adherence thresholds at 20 steps; the guided μ is 1.5–2.2
against 1.1–1.3 for either prediction alone, and the uniform grid's last step has z = −0.82.
"""
import argparse

import numpy as np
import torch

import kiln
from kiln.demo.evaluate import score
from kiln.demo.report import EMBEDDED
from kiln.demo.shapes import heldout_prompts
from kiln.samplers.compvis import ddim_schedule, ddim_step, ddim_timesteps, plms_eps

from guided_jacobian import top_gain  # the same power iteration (run as a script, benchmarks/ is on sys.path)


def plms_capped(eps_fn, x, ac, steps, cap, discretize="uniform"):
    """CompVis' PLMS (kiln.samplers.compvis.sample_plms) with the multistep order at step i limited to cap(i)."""
    ts, a, a_prev, sigma = ddim_schedule(ac, steps, 0.0, discretize)
    order, old = list(reversed(range(len(ts)))), []
    for i, index in enumerate(order):
        e_t = eps_fn(x, int(ts[index]))
        if not old:
            x_next, _ = ddim_step(x, e_t, a[index], a_prev[index], sigma[index])
            e_prime = (e_t + eps_fn(x_next, int(ts[order[min(i + 1, len(order) - 1)]]))) / 2
        else:
            k = min(len(old), cap(i) - 1)
            e_prime = plms_eps(e_t, old[len(old) - k:]) if k > 0 else e_t
        x, _ = ddim_step(x, e_prime, a[index], a_prev[index], sigma[index])
        old = (old + [e_t])[-3:]
    return x


def textured(eps_fn, disc, tau):
    """The noise predictor of the same model trained on latents plus white texture of std τ, exactly: the texture
    and the noise add up to noise of std s = √(σ² + τ²), of which the part that is noise is σ/s."""
    def eps(x, t):
        a = disc.alpha_cumprod_at(t)
        sigma = ((1 - a) / a) ** 0.5
        s = (sigma ** 2 + tau ** 2) ** 0.5
        return sigma / s * eps_fn(x * ((1 / (1 + s * s)) / a) ** 0.5, disc.sigma_to_t(s))
    return eps


def adherence_with(pipe, prompts, scale, steps, cap, discretize, batch=22, texture=0.0):
    """Per-attribute accuracy of capped PLMS over `prompts` (seed = prompt index, as kiln.demo.report does)."""
    from kiln.pipeline import generators, randn, to_uint8

    ac = pipe.alphas_cumprod
    pixels = []
    for i in range(0, len(prompts), batch):
        texts = [p for p, _ in prompts[i:i + batch]]
        cond, uncond = pipe.conditioning(texts, [""] * len(texts))
        eps = pipe.eps_fn(cond, uncond, scale)
        eps = textured(eps, pipe.discrete, texture) if texture else eps
        side = pipe.native_size // pipe.cfg.downscale
        x = randn((pipe.cfg.latent_channels, side, side), generators(range(i, i + len(texts))), pipe.device)
        z = plms_capped(eps, x, ac, steps, cap, discretize)
        pixels += list(to_uint8(pipe.decode_latents(z)))
    return score([(p, lab) for p, (_, lab) in zip(pixels, prompts)])


def stiffness(pipe, prompts, scale, steps, iters=15, h=1e-2):
    """(t, z, μ uncond, μ cond, μ guided) at each step of a DDIM path: power iteration on finite differences."""
    path = []
    texts = [p for p, _ in prompts]
    pipe.txt2img(texts, sampler="ddim", steps=steps, cfg_scale=scale, seed=0, batch_size=len(texts),
                 callback=lambda i, n, x, x0: path.append(x.clone()))
    cond, uncond = pipe.conditioning(texts, [""] * len(texts))
    ac = pipe.alphas_cumprod.double()
    ts = ddim_timesteps(steps, len(ac))[::-1]
    sig = ((1 - ac) / ac).sqrt()
    fns = [pipe.eps_fn(cond, uncond, s) for s in (0.0, 1.0, scale)]
    rows = []
    for i in range(1, len(ts)):
        x, t = path[i - 1], int(ts[i])  # the latent after step i − 1 is the input of step i
        t_next = int(ts[i + 1]) if i + 1 < len(ts) else 0
        z = float((sig[t_next] - sig[t]) / sig[t])
        c = (1 - float(ac[t])) ** 0.5  # μ's operator is √(1 − ᾱ)·∂ε/∂x_t
        rows.append((t, z, *(top_gain(lambda v, f=f, c=c, t=t: c * f(v, t), x, iters=iters, h=h) for f in fns)))
    return rows


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=str(EMBEDDED))
    ap.add_argument("--scale", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--texture", default=None, metavar="TAUS",
                    help="only PLMS on uniform timesteps on the model as if trained with white latent texture of "
                         "these stds (comma-separated), e.g. 0.1,0.2,0.3")
    args = ap.parse_args()
    pipe = kiln.load(args.ckpt, device="cpu", precision="full")
    prompts = heldout_prompts() * 2
    if args.texture:
        for tau in (float(v) for v in args.texture.split(",")):
            r = adherence_with(pipe, prompts, args.scale, args.steps, lambda i: 4, "uniform", texture=tau)
            print(f"texture τ = {tau:g}: " + " / ".join(f"{100 * r[k]:.1f}" for k in
                                                    ("color", "background", "shape", "position")), flush=True)
        return
    n = len(ddim_timesteps(args.steps))
    cases = [("PLMS (order 4)", lambda i: 4, "uniform"), ("order ≤ 3", lambda i: 3, "uniform"),
             ("order ≤ 2", lambda i: 2, "uniform"), ("order ≤ 3 on the last 7 steps", lambda i: 3 if i >= n - 7 else 4,
                                                    "uniform"),
             ("order ≤ 3 on the last step", lambda i: 3 if i == n - 2 else 4, "uniform"),
             ("PLMS on quad timesteps", lambda i: 4, "quad")]
    print(f"{len(prompts)} images, {args.steps} steps, scale {args.scale:g}: color / background / shape / position")
    for name, cap, disc in cases:
        r = adherence_with(pipe, prompts, args.scale, args.steps, cap, disc)
        print(f"  {name:32s} " + " / ".join(f"{100 * r[k]:.1f}" for k in ("color", "background", "shape", "position")),
              flush=True)
    print("\nstiffness along DDIM paths of 8 held-out prompts (mean over prompts):")
    print(f"{'t':>4} {'z':>6} {'μ uncond':>9} {'μ cond':>7} {'μ guided':>9} {'|z·μ guided|':>13}")
    for t, z, mu_u, mu_c, mu_g in stiffness(pipe, heldout_prompts()[::5][:8], args.scale, args.steps):
        print(f"{t:>4} {z:>6.2f} {mu_u:>9.2f} {mu_c:>7.2f} {mu_g:>9.2f} {abs(z) * mu_g:>13.2f}", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
