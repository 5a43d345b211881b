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
from .samplers import SAMPLERS, get_sampler
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


@dataclass
class Pipeline:
    model: LatentDiffusion
    info: LoadInfo
    device: torch.device
    dtype: torch.dtype
    precision: str = "full"
    notices: list = field(default_factory=list)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def native_size(self):
        return self.cfg.native_size

    def __post_init__(self):
        self.alphas_cumprod = alphas_cumprod(self.cfg)
        self.tokenizer = default_tokenizer()

    # ------------------------------------------------------------------ building blocks
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), max_length=self.cfg.text.max_position).to(self.device)
        return self.model.text_model(ids)

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
        """The guided noise predictor the samplers call: one batched UNet pass for [uncond, cond]."""
        unet, ac, v_pred = self.model.unet, self.alphas_cumprod, self.cfg.parameterization == "v"

        def predict(x, t):
            b = x.shape[0]
            if uncond is None:
                out = unet(x, torch.full((b,), t, device=self.device), cond)
            else:
                out_u, out_c = unet(torch.cat([x, x]), torch.full((2 * b,), t, device=self.device),
                                    torch.cat([uncond, cond])).chunk(2)
                out = out_u + scale * (out_c - out_u)
            if v_pred:  # v → ε, so that every sampler works on ε: ε = √ᾱ·v + √(1−ᾱ)·x
                a = ac[int(t)].item()
                out = a ** 0.5 * out + (1 - a) ** 0.5 * x
            return out

        return predict

    # ------------------------------------------------------------------ txt2img
    def check_size(self, width, height):
        unit = max(8, self.cfg.downscale)
        for name, v in (("width (--W)", width), ("height (--H)", height)):
            if v < unit or v % unit:
                raise KilnError(f"{name} must be a positive multiple of {unit}, got {v}")

    def txt2img_iter(self, prompt: str | list[str] = "", *, negative_prompt: str = "", steps: int = 50,
                     sampler: str = "ddim", cfg_scale: float = 7.5, width: int | None = None,
                     height: int | None = None, seed: int = 42, batch_size: int = 1, n_iter: int = 1,
                     eta: float = 0.0, fixed_code: bool = False, progress: bool = False, callback=None):
        """Yields one `Result` per batch. `prompt` as a list gives the batches' prompts in order
        (chunked by `batch_size`, the last chunk may be short), as CompVis' `--from-file` does."""
        if self.cfg.unet.in_channels != self.cfg.latent_channels:
            raise KilnError(f"{self.info.path} is an inpainting model ({self.cfg.unet.in_channels}-channel UNet); "
                            "txt2img needs an ordinary checkpoint")
        width = width or self.native_size
        height = height or self.native_size
        self.check_size(width, height)
        if batch_size < 1 or n_iter < 1:
            raise KilnError(f"n_samples and n_iter must be at least 1 (got {batch_size} and {n_iter})")
        if steps < 1 or steps > 1000:
            raise KilnError(f"steps must be between 1 and 1000, got {steps}")
        sample = get_sampler(sampler)
        if sampler == "plms" and eta != 0:
            raise KilnError("the PLMS sampler is deterministic: --ddim_eta must be 0")
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise KilnError("no prompts given")
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        shape = (self.cfg.latent_channels, height // self.cfg.downscale, width // self.cfg.downscale)
        params = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, width=width, height=height,
                      negative_prompt=negative_prompt, eta=eta, batch_size=batch_size, n_iter=n_iter,
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
                    cond = self.encode_prompts(batch)
                    uncond = self.encode_prompts([negative_prompt] * len(batch)) if cfg_scale != 1.0 else None
                    bar = tqdm(total=steps, desc="sampling", unit="step", disable=not progress, leave=False)

                    def on_step(i, total, x_i, pred_x0):
                        bar.total = total
                        bar.update(1)
                        if callback:
                            callback(i, total, x_i, pred_x0)

                    noise = lambda like: randn(like.shape[1:], gens, like.device, like.dtype)
                    z = sample(self.eps_fn(cond, uncond, cfg_scale), x.to(self.dtype), self.alphas_cumprod,
                               steps, eta=eta, noise=noise, callback=on_step)
                    bar.close()
                    pixels = to_uint8(self.decode_latents(z))
                yield Result([Image.fromarray(p) for p in pixels], seeds, list(batch), params, z, pixels)

    def txt2img(self, prompt: str | list[str] = "", **kw) -> Result:
        """All batches of `txt2img_iter` in one Result."""
        parts = list(self.txt2img_iter(prompt, **kw))
        return Result([im for r in parts for im in r.images], [s for r in parts for s in r.seeds],
                      [p for r in parts for p in r.prompts], parts[0].params,
                      torch.cat([r.latents for r in parts]), np.concatenate([r.pixels for r in parts]))


def load(path: str | Path, *, device: str = "auto", precision: str = "full", ema: str = "auto",
         vae: str | None = None, config: str | None = None) -> Pipeline:
    """Load a checkpoint (CompVis file or diffusers folder) into a ready Pipeline."""
    dev = pick_device(device)
    dtype = compute_dtype(precision, dev)
    model, info = load_model(path, ema=ema, vae=vae, config_yaml=config, dtype=dtype, device=dev)
    return Pipeline(model, info, dev, dtype, precision)


__all__ = ["Pipeline", "Result", "load", "pick_device", "compute_dtype", "SAMPLERS"]
