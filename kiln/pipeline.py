"""txt2img orchestration: the one code path that the CLI, the server and Ray all call.

    pipe = kiln.load("v1-5-pruned-emaonly.safetensors")
    result = pipe.txt2img("a red circle on a blue background", steps=20, seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoints import LoadInfo, load_model
from .errors import KilnError
from .models.sd import LatentDiffusion, alphas_cumprod
from .prompts import CHUNK, chunk_tokens
from .samplers import SAMPLERS, Discrete, discrete_denoiser, get_sigmas, resolve
from .tokenizer import default_tokenizer

PRECISIONS = ("full", "autocast")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise KilnError("--device mps: no Apple MPS device is available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise KilnError(f"--device must be auto, cpu, cuda or mps, not {name!r}")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix math (AVX512-BF16 or AMX); without it bf16 on a CPU is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`full` is fp32; `autocast` is fp16 on CUDA/MPS and bf16 on CPUs with native bf16 (fp32 on other CPUs)."""
    if precision not in PRECISIONS:
        raise KilnError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "full":
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float16


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] uint8, truncating as CompVis' scripts do."""
    x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)
    return (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(shape, gens, device, dtype=torch.float32):
    """One draw per image from that image's own CPU generator: identical on every device and batch size."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)


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

    def only(self, i: int) -> "Result":
        """The i-th image alone, as a Result."""
        pick = lambda xs: xs[i:i + 1] if xs is not None and len(xs) else xs
        return Result(pick(self.images), pick(self.seeds), pick(self.prompts), self.params, pick(self.latents),
                      pick(self.pixels), pick(self.infotexts), pick(self.flagged))


@dataclass
class Pipeline:
    model: LatentDiffusion
    info: LoadInfo
    device: torch.device
    dtype: torch.dtype
    precision: str = "full"
    notices: list = field(default_factory=list)
    hash_models: bool = True

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def native_size(self):
        return self.cfg.native_size

    @property
    def model_name(self) -> str:
        return Path(self.info.path).stem if not Path(self.info.path).is_dir() else Path(self.info.path).name

    @property
    def model_hash(self) -> str | None:
        """AutoV2 hash of the checkpoint (SHA-256 cached beside the file); None when hashing is off."""
        if self._model_hash is None and self.hash_models:
            from .checkpoints.hashes import autov2

            self._model_hash = autov2(self.info.path)
        return self._model_hash

    def infotext(self, params: dict, prompt: str, seed: int, extra: dict | None = None) -> str:
        from .postprocess.infotext import format_infotext, generation_fields

        vae = self.info.vae_path
        fields = generation_fields(params, seed, self.model_name, self.model_hash,
                                   Path(vae).name if vae else None, extra=extra)
        return format_infotext(prompt, params.get("negative_prompt", ""), fields)

    def load_safety_checker(self, path) -> None:
        """Check every generated image with CompVis' safety checker (weights: a diffusers folder or file)."""
        from .checkpoints.safety import load_safety_checker

        self.safety_checker = load_safety_checker(path, self.device, self.dtype)

    def _safety(self, pixels: np.ndarray):
        if self.safety_checker is None:
            return pixels, []
        from .postprocess.safety import check_images

        r = check_images(self.safety_checker, pixels, self.device, self.dtype)
        return r.pixels, r.flagged

    def __post_init__(self):
        self.safety_checker = None
        self._model_hash = None
        self.alphas_cumprod = alphas_cumprod(self.cfg)
        self.discrete = Discrete(self.alphas_cumprod)
        self.tokenizer = default_tokenizer()

    # ------------------------------------------------------------------ building blocks
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts in A1111's language → [B, 77·chunks, C] hidden states (see `kiln.prompts`).

        Each 75-token chunk is encoded on its own; emphasis multiplies the chunk's hidden states and then restores
        their mean (A1111's "Original" emphasis). Prompts with fewer chunks are padded with the empty prompt's."""
        if clip_skip < 1 or clip_skip > self.cfg.text.layers:
            raise KilnError(f"clip skip must be between 1 and {self.cfg.text.layers}, got {clip_skip}")
        if self.cfg.text.max_position != CHUNK + 2:
            raise KilnError(f"the text encoder has {self.cfg.text.max_position} positions; prompts need {CHUNK + 2}")
        per_prompt = [chunk_tokens(self.tokenizer, p) for p in prompts]
        flat = [c for chunks in per_prompt for c in chunks]
        ids = torch.tensor([c.ids for c in flat], device=self.device)
        z = self.model.text_model(ids, skip=clip_skip - 1, final_norm=True)
        weighted = []
        for c, zc in zip(flat, z):
            if any(w != 1.0 for w in c.weights):
                mean = zc.float().mean()
                zc = zc * torch.tensor(c.weights, device=zc.device, dtype=zc.dtype)[:, None]
                zc = zc * (mean / zc.float().mean()).to(zc.dtype)
            weighted.append(zc)
        out, i = [], 0
        for chunks in per_prompt:
            out.append(torch.cat(weighted[i:i + len(chunks)]))
            i += len(chunks)
        return self._pad_chunks(out, clip_skip)

    def _pad_chunks(self, hidden: list[torch.Tensor], clip_skip: int, length: int | None = None) -> torch.Tensor:
        length = length or max(h.shape[0] for h in hidden)
        if all(h.shape[0] == length for h in hidden):
            return torch.stack(hidden)
        empty = self.encode_prompts([""], clip_skip)[0]
        return torch.stack([torch.cat([h] + [empty] * ((length - h.shape[0]) // empty.shape[0])) for h in hidden])

    def conditioning(self, prompts: list[str], negative: list[str] | None, clip_skip: int = 1):
        """(cond, uncond) with a common sequence length (uncond None when guidance is off)."""
        cond = self.encode_prompts(prompts, clip_skip)
        if negative is None:
            return cond, None
        uncond = self.encode_prompts(negative, clip_skip)
        n = max(cond.shape[1], uncond.shape[1])
        return (self._pad_chunks(list(cond), clip_skip, n), self._pad_chunks(list(uncond), clip_skip, n))

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], fp32; re-decodes in fp32 if half precision overflowed."""
        vae = self.model.vae
        x = vae.decode(z.to(self.dtype) / self.cfg.scale_factor)
        if not torch.isfinite(x).all() and self.dtype != torch.float32:
            self.notices.append("the VAE produced non-finite values in half precision; decoded in fp32 instead")
            vae.float()
            x = vae.decode(z.float() / self.cfg.scale_factor)
            vae.to(self.dtype)
        return x.float()

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, gens=None) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (posterior sample with per-image generators, or the mean)."""
        mean, logvar = self.model.vae.encode(x.to(self.device, self.dtype))
        if gens is None:
            return mean * self.cfg.scale_factor
        std = torch.exp(0.5 * logvar)
        return (mean + std * randn(mean.shape[1:], gens, self.device, mean.dtype)) * self.cfg.scale_factor

    def eps_fn(self, cond, uncond, scale):
        """The guided noise predictor the samplers call at step t (fractional t allowed): one batched UNet pass
        for [uncond, cond]. Takes and returns fp32; the UNet runs in the pipeline's dtype."""
        unet, disc, v_pred = self.model.unet, self.discrete, self.cfg.parameterization == "v"

        def predict(x, t):
            b = x.shape[0]
            xin = x.to(self.dtype)
            if uncond is None:
                out = unet(xin, torch.full((b,), float(t), device=self.device), cond).float()
            else:
                out_u, out_c = unet(torch.cat([xin, xin]), torch.full((2 * b,), float(t), device=self.device),
                                    torch.cat([uncond, cond])).float().chunk(2)
                out = out_u + scale * (out_c - out_u)
            if v_pred:  # v → ε, so that every sampler works on ε: ε = √ᾱ·v + √(1−ᾱ)·x
                a = disc.alpha_cumprod_at(t)
                out = a ** 0.5 * out + (1 - a) ** 0.5 * x
            return out

        return predict

    def sample(self, x, cond, uncond, cfg_scale, *, sampler, schedule, steps, eta, s_noise, gens, callback=None):
        """Run one sampler from unit noise `x` (fp32) to a clean latent. Noise drawn while sampling comes from the
        images' own generators, so every image is reproducible on its own."""
        noise = lambda like: randn(like.shape[1:], gens, like.device, torch.float32)
        eps_fn = self.eps_fn(cond, uncond, cfg_scale)
        if sampler.kind == "eps":
            return sampler.fn(eps_fn, x, self.alphas_cumprod, steps, eta=eta, noise=noise, callback=callback)
        sigmas = get_sigmas(self.discrete, schedule, steps)
        denoise = discrete_denoiser(eps_fn, self.discrete)
        return sampler.fn(denoise, x * float(sigmas[0]), sigmas, noise=noise, callback=callback,
                          eta=eta, s_noise=s_noise)

    # ------------------------------------------------------------------ txt2img
    def check_size(self, width, height):
        unit = max(8, self.cfg.downscale)
        for name, v in (("width (--W)", width), ("height (--H)", height)):
            if v < unit or v % unit:
                raise KilnError(f"{name} must be a positive multiple of {unit}, got {v}")

    def _check_common(self, steps, batch_size, n_iter, sampler, schedule, eta):
        if batch_size < 1 or n_iter < 1:
            raise KilnError(f"n_samples and n_iter must be at least 1 (got {batch_size} and {n_iter})")
        if steps < 1 or steps > 1000:
            raise KilnError(f"steps must be between 1 and 1000, got {steps}")
        try:
            spec, sched = resolve(sampler, schedule)
        except ValueError as e:
            raise KilnError(str(e)) from None
        if eta is None:
            eta = spec.eta or 0.0
        if eta and spec.eta is None:
            raise KilnError(f"the {spec.name} sampler is deterministic and has no eta (got {eta})")
        if eta < 0:
            raise KilnError(f"eta must be >= 0, got {eta}")
        return spec, sched, float(eta)

    def preview(self, latents: torch.Tensor) -> list:
        """Cheap latent → RGB previews (a linear map of the latent channels, no VAE): latent-sized PIL images."""
        m = self.cfg.latent_rgb_matrix()
        rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), m[:-1]) + m[-1].view(1, 3, 1, 1)
        return [Image.fromarray(p) for p in to_uint8(rgb)]

    def _step_callback(self, bar, callback, preview_every, on_preview, preview_full, seeds):
        def on_step(i, total, x_i, pred_x0):
            bar.total = total
            bar.update(1)
            if callback:
                callback(i, total, x_i, pred_x0)
            if on_preview and preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
                images = ([Image.fromarray(p) for p in to_uint8(self.decode_latents(pred_x0))] if preview_full
                          else self.preview(pred_x0))
                on_preview(i, total, images, seeds)
        return on_step

    def txt2img_iter(self, prompt: str | list[str] = "", *, negative_prompt: str = "", steps: int = 50,
                     sampler: str = "ddim", schedule: str | None = None, cfg_scale: float = 7.5,
                     width: int | None = None, height: int | None = None, seed: int = 42, batch_size: int = 1,
                     n_iter: int = 1, eta: float | None = None, s_noise: float = 1.0, clip_skip: int = 1,
                     fixed_code: bool = False, progress: bool = False, callback=None,
                     preview_every: int = 0, on_preview=None, preview_full: bool = False):
        """Yields one `Result` per batch. `prompt` as a list gives the batches' prompts in order
        (chunked by `batch_size`, the last chunk may be short), as CompVis' `--from-file` does.

        `sampler`/`schedule` take our names or A1111's ("DPM++ 2M Karras"); `eta` None is the sampler's default.
        `callback(i, total, x, pred_x0)` runs after every step; `on_preview(i, total, images, seeds)` every
        `preview_every` steps with cheap previews of pred_x0 (VAE-decoded with `preview_full`)."""
        if self.cfg.unet.in_channels != self.cfg.latent_channels:
            raise KilnError(f"{self.info.path} is an inpainting model ({self.cfg.unet.in_channels}-channel UNet); "
                            "txt2img needs an ordinary checkpoint")
        width = width or self.native_size
        height = height or self.native_size
        self.check_size(width, height)
        spec, sched, eta = self._check_common(steps, batch_size, n_iter, sampler, schedule, eta)
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise KilnError("no prompts given")
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        shape = (self.cfg.latent_channels, height // self.cfg.downscale, width // self.cfg.downscale)
        params = dict(steps=steps, sampler=spec.name, schedule=sched if spec.kind == "denoise" else None,
                      cfg_scale=cfg_scale, width=width, height=height, negative_prompt=negative_prompt, eta=eta,
                      s_noise=s_noise, clip_skip=clip_skip, batch_size=batch_size, n_iter=n_iter,
                      fixed_code=fixed_code, precision=self.precision, ema=self.info.ema_used)
        index, first_codes = 0, None
        for _ in range(n_iter):
            for batch in batches:
                seeds = [seed + index + j for j in range(len(batch))]
                index += len(batch)
                gens = generators(seeds)
                x = randn(shape, gens, self.device)
                if fixed_code:
                    first_codes = x if first_codes is None else first_codes
                    x = first_codes[: len(batch)]
                with torch.no_grad():
                    cond, uncond = self.conditioning(
                        batch, [negative_prompt] * len(batch) if cfg_scale != 1.0 else None, clip_skip)
                    bar = tqdm(total=steps, desc="sampling", unit="step", disable=not progress, leave=False)
                    on_step = self._step_callback(bar, callback, preview_every, on_preview, preview_full, seeds)
                    z = self.sample(x, cond, uncond, cfg_scale, sampler=spec, schedule=sched, steps=steps,
                                    eta=eta, s_noise=s_noise, gens=gens, callback=on_step)
                    bar.close()
                    pixels, flagged = self._safety(to_uint8(self.decode_latents(z)))
                # A1111 records the batch so that an image can be regenerated bit for bit (batch size changes
                # the kernels' summation order, hence the last bit of some pixels).
                infos = [self.infotext(params, p, sd, {"Batch size": len(batch), "Batch pos": j} if len(batch) > 1
                                       else None) for j, (p, sd) in enumerate(zip(batch, seeds))]
                yield Result([Image.fromarray(p) for p in pixels], seeds, list(batch), params, z, pixels, infos,
                             flagged)

    def txt2img(self, prompt: str | list[str] = "", **kw) -> Result:
        """All batches of `txt2img_iter` in one Result."""
        parts = list(self.txt2img_iter(prompt, **kw))
        return Result([im for r in parts for im in r.images], [s for r in parts for s in r.seeds],
                      [p for r in parts for p in r.prompts], parts[0].params,
                      torch.cat([r.latents for r in parts]), np.concatenate([r.pixels for r in parts]),
                      [t for r in parts for t in r.infotexts], [f for r in parts for f in r.flagged])


def load(path: str | Path, *, device: str = "auto", precision: str = "full", ema: str = "auto",
         vae: str | None = None, config: str | None = None) -> Pipeline:
    """Load a checkpoint (CompVis file or diffusers folder) into a ready Pipeline."""
    dev = pick_device(device)
    dtype = compute_dtype(precision, dev)
    model, info = load_model(path, ema=ema, vae=vae, config_yaml=config, dtype=dtype, device=dev)
    return Pipeline(model, info, dev, dtype, precision)


__all__ = ["Pipeline", "Result", "load", "pick_device", "compute_dtype", "SAMPLERS"]
