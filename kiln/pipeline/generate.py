"""The one generation loop, batch by batch: seeds → start noise → conditioning → sampling (→ hires fix) →
decoding → compositing → safety check → infotexts. txt2img, img2img, inpainting and outpainting differ only in
their `Canvas`: the latents sampling starts from, and how the decoded pixels are put back into the picture."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..samplers.run import sample, steps_run
from . import denoiser
from .canvas import Canvas, img2img_canvas, txt2img_canvas
from .lora import apply_networks
from .noise import randn, start_noise
from .params import Checked, GenerationParams, check, hires_upscaler_key, infotext_fields, record
from .conds import Clock, prompt_conds
from .decoders import tiny_decode, tiny_previews
from .control import activate, control_fields
from .vae import decode_latents, encode_images, latent_preview, to_model_input, to_uint8


@dataclass
class Result:
    images: list  # PIL images
    seeds: list[int]
    prompts: list[str]
    params: dict
    latents: torch.Tensor | None = None
    pixels: np.ndarray | None = None  # [B, H, W, 3] uint8, the same pixels as `images`
    infotexts: list[str] = field(default_factory=list)  # A1111 "parameters" text per image
    flagged: list[bool] = field(default_factory=list)  # safety checker verdicts (empty when it did not run)
    notices: list[str] = field(default_factory=list)  # what the user should know so far (e.g. init image resized)

    def only(self, i: int) -> Result:
        """The i-th image alone, as a Result."""
        pick = lambda xs: xs[i:i + 1] if xs is not None and len(xs) else xs
        return Result(pick(self.images), pick(self.seeds), pick(self.prompts), self.params, pick(self.latents),
                      pick(self.pixels), pick(self.infotexts), pick(self.flagged), self.notices)


def join(parts: list[Result]) -> Result:
    return Result([im for r in parts for im in r.images], [s for r in parts for s in r.seeds],
                  [p for r in parts for p in r.prompts], parts[0].params,
                  torch.cat([r.latents for r in parts]), np.concatenate([r.pixels for r in parts]),
                  [t for r in parts for t in r.infotexts], [f for r in parts for f in r.flagged],
                  list(dict.fromkeys(n for r in parts for n in r.notices)))


@dataclass
class Hooks:
    """How a front end watches a run: a progress bar, `callback(i, total, x, pred_x0)` after every step, and
    `on_preview(i, total, images, seeds)` every `preview_every` steps (decoded by the pipeline's preview decoder
    when it has one, else by the VAE with `preview_full`, else the cheap latent previews). With `preview_share`,
    a due preview is skipped while the last one cost more than that share of the sampling time since it."""
    progress: bool = False
    callback: Callable | None = None
    preview_every: int = 0
    on_preview: Callable | None = None
    preview_full: bool = False
    preview_share: float = 0.0  # 0: no limit


class PreviewBudget:
    """Previews take at most `share` of the time: one is made only when the last one's cost is at most `share`
    of the time since it ended (the first is always made). 0: no limit."""

    def __init__(self, share: float):
        self.share, self.cost, self.since = share, 0.0, time.perf_counter()

    def allows(self) -> bool:
        return not self.share or self.cost <= self.share * (time.perf_counter() - self.since)

    def spent(self, started: float):
        self.since = time.perf_counter()
        self.cost = self.since - started


def generate(pipe, p: GenerationParams, hooks: Hooks | None = None):
    """Yields one `Result` per batch (n_iter × the batches of the prompts)."""
    hooks = hooks or Hooks()
    c = check(p, pipe)
    notices = []
    canvas = img2img_canvas(pipe, p, notices) if p.mode == "img2img" else txt2img_canvas(pipe, p)
    recorded = record(p, c, pipe, canvas.width, canvas.height, canvas.masked)
    fields = infotext_fields(p, recorded, pipe, canvas.region is not None, canvas.masked)
    index, first_codes = 0, None
    for _ in range(p.n_iter):
        for batch in c.batches:
            seeds = [p.seed + index + j for j in range(len(batch))]
            index += len(batch)
            x, gens = start_noise(canvas.shape, seeds, pipe.device, *c.variation(seeds))
            if p.fixed_code:
                first_codes = x if first_codes is None else first_codes
                x = first_codes[:len(batch)]
            result, own = _batch(pipe, p, c, canvas, batch, seeds, x, gens, hooks, notices)
            result.params = recorded
            # A1111 records the batch so that an image can be regenerated bit for bit (batch size changes the
            # kernels' summation order, hence the last bit of some pixels).
            n = len(batch)
            result.infotexts = [pipe.infotext(recorded, text, seed, {
                **fields, **own, **({"Batch size": n, "Batch pos": j} if n > 1 else {})})
                for j, (text, seed) in enumerate(zip(batch, seeds))]
            yield result


def _batch(pipe, p: GenerationParams, c: Checked, canvas: Canvas, batch, seeds, x, gens, hooks, notices):
    """One batch, from its start noise to finished pixels: (its Result, its own infotext fields)."""
    n = len(batch)
    init = canvas.start(n, gens, pipe.device)
    used = {}
    clean, lora_fields = apply_networks(pipe, batch, p.loras)
    noise = lambda like: randn(like.shape[1:], gens, like.device, torch.float32)
    size = (canvas.width, canvas.height)
    clock = Clock(total=steps_run(c.spec, pipe.discrete, c.schedule, p.steps, p.strength if init is not None else 1.0))
    with torch.no_grad():
        conds = prompt_conds(pipe, clean, p.negative_prompt, p.steps, guidance=p.scale != 1.0,
                             clip_skip=p.clip_skip, size=size, used=used, clock=clock)
        control = (activate(pipe, p.controlnets, *size, p.mask), clock) if p.controlnets else None
        unit_fields = control_fields(control[0]) if control else {}
        eps = denoiser.build(pipe, conds, None, p.scale, tile=p.tile, control=control,
                             concat=None if canvas.concat is None else canvas.concat.expand(n, -1, -1, -1))
        refine = _refiner(pipe, p, clean, size, clock) if pipe.refiner is not None else None
        bar = tqdm(total=p.steps, desc="sampling", unit="step", disable=not hooks.progress, leave=False)
        on_step = _step_callback(pipe, p, bar, hooks, seeds)
        with pipe.seamless(p.seamless):
            z = sample(c.spec, eps, x, disc=pipe.discrete, schedule=c.schedule, steps=p.steps, eta=c.eta,
                       s_noise=p.s_noise, noise=noise, callback=clock.ticking(on_step), init=init,
                       strength=p.strength if init is not None else 1.0, refiner=refine,
                       known_mask=None if (not canvas.masked or canvas.concat is not None)
                       else canvas.known.expand_as(init))
            if c.hires is not None:
                z = _hires(pipe, p, c, z, clean, size, gens, noise, on_step)
            bar.close()
            pixels = to_uint8(tiny_decode(c.decoder, z) if c.decoder is not None
                              else decode_latents(pipe, z, p.tile, notices))
        pixels = canvas.finish(pixels)
        pixels, flagged = pipe.safety(pixels)
        pixels = _watermark(pipe, p, pixels, notices)
    ti = {"TI hashes": ", ".join(f"{e.name}: {e.short_hash}" for e in used.values())} if used else {}
    return Result([Image.fromarray(px) for px in pixels], seeds, list(batch), {}, z, pixels, [], flagged,
                  list(notices)), {**lora_fields, **ti, **unit_fields}


def _watermark(pipe, p: GenerationParams, pixels, notices):
    """The invisible watermark on every image large enough to carry it (after the safety check: a blacked-out
    image is marked too, as CompVis' scripts do)."""
    from .watermark import can_watermark, put_watermark

    text = p.watermark_text(pipe.cfg)
    if not text:
        return pixels
    if not can_watermark(pixels[0]):
        note = "images smaller than 256x256 cannot carry the invisible watermark; made without it"
        notices.extend([note] if note not in notices else [])
        return pixels
    return np.stack([put_watermark(px, text) for px in pixels])


def _refiner(pipe, p, clean, size, clock):
    """(the refiner's guided ε, the switch) for this batch's prompts, on the base model's step clock."""
    r = pipe.refiner
    conds = prompt_conds(r, clean, p.negative_prompt, p.steps, guidance=p.scale != 1.0,
                         clip_skip=min(p.clip_skip, r.max_clip_skip), size=size, clock=clock)
    return denoiser.build(r, conds, None, p.scale, tile=p.tile), pipe.refiner_switch


def _hires(pipe, p, c, z, clean, size, gens, noise, callback):
    """Upscale a finished latent to the hires size and re-render it there (A1111's hires fix), with the prompts'
    schedules of that pass. `callback` sees this pass's steps counted from 0 again (the server's progress counts
    the two passes)."""
    w, h = c.hires
    lat = (h // pipe.cfg.downscale, w // pipe.cfg.downscale)
    if hires_upscaler_key(p.hires_upscaler) == "latent":
        init = torch.nn.functional.interpolate(z, size=lat, mode="bilinear", align_corners=False)
    else:
        # a non-latent upscaler (Lanczos, Nearest, a model such as ESRGAN) works on the decoded picture, which is
        # then encoded again (A1111)
        px = to_uint8(decode_latents(pipe, z, p.tile))
        big = np.stack([np.asarray(pipe.upscalers.upscale(Image.fromarray(x), w, h, p.hires_upscaler)) for x in px])
        init = encode_images(pipe, to_model_input(big), tile=p.tile).float()
    start = randn((z.shape[1], *lat), gens, pipe.device)
    steps = p.hires_steps or p.steps
    clock = Clock(total=steps_run(c.spec, pipe.discrete, c.schedule, steps, p.hires_strength))
    conds = prompt_conds(pipe, clean, p.negative_prompt, p.steps, guidance=p.scale != 1.0, clip_skip=p.clip_skip,
                         size=size, clock=clock, hires_steps=steps)
    control = (activate(pipe, p.controlnets, w, h), clock) if p.controlnets else None  # again, at its size
    eps = denoiser.build(pipe, conds, None, p.scale, tile=p.tile, control=control)
    return sample(c.spec, eps, start, disc=pipe.discrete, schedule=c.schedule, steps=steps, eta=c.eta,
                  s_noise=p.s_noise, noise=noise, callback=clock.ticking(callback), init=init,
                  strength=p.hires_strength)


def _step_callback(pipe, p, bar, hooks: Hooks, seeds):
    """After every step: the progress bar, `hooks.callback` (the sampler's own i and total: they start again
    with the hires pass), and previews, numbered over both passes (the hires pass's follow the first's)."""
    done = {"last": -1, "before": 0, "total": 0}  # steps of the passes before this one
    budget = PreviewBudget(hooks.preview_share)

    def on_step(i, total, x_i, pred_x0):
        if i <= done["last"]:  # a new pass (the hires fix)
            done["before"] += done["total"]
        done["last"], done["total"] = i, total
        bar.total = done["before"] + total
        bar.update(1)
        if hooks.callback:
            hooks.callback(i, total, x_i, pred_x0)
        every = hooks.preview_every
        if hooks.on_preview and every and ((i + 1) % every == 0 or i + 1 == total) and budget.allows():
            started = time.perf_counter()
            images = _previews(pipe, p, hooks, pred_x0)
            hooks.on_preview(done["before"] + i, bar.total, images, seeds)
            budget.spent(started)
    return on_step


def _previews(pipe, p, hooks: Hooks, pred_x0) -> list:
    """The pipeline's preview decoder (TAESD: full size, cheap), else the VAE if the hooks ask for it, else the
    latent-sized linear approximation."""
    if pipe.preview_decoder is not None:
        return tiny_previews(pipe.preview_decoder, pred_x0)
    if hooks.preview_full:
        return [Image.fromarray(px) for px in to_uint8(decode_latents(pipe, pred_x0, p.tile))]
    return latent_preview(pipe.cfg, pred_x0)


__all__ = ["Result", "Hooks", "Canvas", "generate", "join"]
