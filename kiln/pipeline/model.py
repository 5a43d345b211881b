"""`Pipeline`: a loaded model and its settings (device, precision, LoRA/embedding folders, refiner, DeepCache,
offloading), with the generation entry points. Per-request state lives on `GenerationParams` and `Result`.

    pipe = kiln.load("v1-5-pruned-emaonly.safetensors")
    result = pipe.txt2img("a red circle on a blue background", steps=20, seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import LoadInfo
from ..errors import KilnError
from ..models.sd import LatentDiffusion, alphas_cumprod
from ..samplers import Discrete
from ..tokenizer import EOS, default_tokenizer
from . import denoiser, lora, runtime, text, vae
from .generate import Hooks, Result, generate, join
from .params import GenerationParams, check_size
from .upscalers import Upscalers

HOOKS = ("progress", "callback", "preview_every", "on_preview", "preview_full", "preview_share")


@dataclass
class Pipeline:
    model: LatentDiffusion
    info: LoadInfo
    device: torch.device
    dtype: torch.dtype
    precision: str = "full"
    notices: list = field(default_factory=list)  # about the model and the files it read (LoRAs, embeddings)
    hash_models: bool = True

    def __post_init__(self):
        self.safety_checker = None
        self._model_hash = None
        self.alphas_cumprod = alphas_cumprod(self.cfg)
        self.discrete = Discrete(self.alphas_cumprod, sdxl=self.cfg.is_sdxl)
        # one tokenizer per text encoder: the same BPE, but open_clip pads with 0 where OpenAI's CLIP repeats the end
        self.tokenizers = [default_tokenizer(0 if t.kind == "openclip" else EOS)
                           for t in (self.cfg.text, self.cfg.text2) if t is not None]
        self.tokenizer = self.tokenizers[0]
        self.lora_dir = None  # where <lora:name:w> tags are looked up
        self.embeddings_dir = None  # textual-inversion files, used in prompts by file name
        self.upscalers = Upscalers(device=str(self.device), precision=self.precision)  # hires fix's model upscalers
        self._lora_cache, self._lora_applied, self._lora_backup, self._emb_cache = {}, (), {}, {}
        self._controlnets = {}  # ControlNet file → its model, loaded once (`control.load_unit_model`)
        self.refiner = None  # a second Pipeline that finishes the last steps (SDXL refiner)
        self.refiner_switch = 0.8
        self.offloader = None  # see `offload`
        self.deepcache = None  # (interval, depth): see `set_deepcache`
        self.frozen = None  # after `compile`: whether inductor froze the weights into the graphs
        self.vae_approx_dir = None  # where the decoder "TAESD" is looked up (A1111's models/VAE-approx)
        self.tiny_decoders = {}  # TAESD files → loaded decoders (`decoders.load_decoder`)
        self.preview_decoder = None  # a TAESD decoder for the live previews: see `set_preview_decoder`

    # ------------------------------------------------------------------ facts
    @property
    def cfg(self):
        return self.model.cfg

    @property
    def native_size(self):
        return self.cfg.native_size

    @property
    def max_clip_skip(self) -> int:
        """Clip skip counts from the layer the model conditions on (SD 2.x: the penultimate is clip skip 1)."""
        return self.cfg.text.layers - self.cfg.text_skip

    @property
    def model_name(self) -> str:
        return Path(self.info.path).stem if not Path(self.info.path).is_dir() else Path(self.info.path).name

    @property
    def model_hash(self) -> str | None:
        """AutoV2 hash of the checkpoint (SHA-256 cached beside the file); None when hashing is off."""
        if self._model_hash is None and self.hash_models:
            from ..checkpoints.hashes import autov2

            self._model_hash = autov2(self.info.path)
        return self._model_hash

    def infotext(self, params: dict, prompt: str, seed: int, extra: dict | None = None) -> str:
        from .infotext import format_infotext, generation_fields

        vae_path = self.info.vae_path
        fields = generation_fields(params, seed, self.model_name, self.model_hash,
                                   Path(vae_path).name if vae_path else None, extra=extra)
        return format_infotext(prompt, params.get("negative_prompt", ""), fields)

    # ------------------------------------------------------------------ generation
    def generate(self, params: GenerationParams, hooks: Hooks | None = None):
        """Yields one `Result` per batch."""
        return generate(self, params, hooks)

    def txt2img_iter(self, prompt: str | list[str] = "", **kw):
        """`generate` from keyword arguments: `GenerationParams`' fields and `Hooks`' (progress, callback,
        preview_every, on_preview, preview_full)."""
        hooks = Hooks(**{k: kw.pop(k) for k in HOOKS if k in kw})
        return generate(self, GenerationParams.make(prompt=prompt, **kw), hooks)

    def img2img_iter(self, prompt: str | list[str], init_image, **kw):
        """img2img (and, with `mask` — white = repaint — or `outpaint`, inpainting): see `GenerationParams`."""
        return self.txt2img_iter(prompt, init_image=init_image, **kw)

    def txt2img(self, prompt: str | list[str] = "", **kw) -> Result:
        """All batches of `txt2img_iter` in one Result."""
        return join(list(self.txt2img_iter(prompt, **kw)))

    def img2img(self, prompt: str | list[str], init_image, **kw) -> Result:
        return join(list(self.img2img_iter(prompt, init_image, **kw)))

    def check_size(self, width, height):
        check_size(self.cfg, width, height)

    # ------------------------------------------------------------------ stages, for callers that compose their own
    def encode_prompts(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        return text.encode_prompts_pooled(self, prompts, clip_skip)[0]

    def encode_prompts_pooled(self, prompts: list[str], clip_skip: int = 1):
        return text.encode_prompts_pooled(self, prompts, clip_skip)

    def conditioning(self, prompts, negative, clip_skip=1, size=None, aesthetic=(6.0, 2.5), used=None):
        return text.conditioning(self, prompts, negative, clip_skip, size, aesthetic, used)

    def decode_latents(self, z: torch.Tensor, tile: str = "auto") -> torch.Tensor:
        return vae.decode_latents(self, z, tile)

    def encode_images(self, x: torch.Tensor, gens=None, tile: str = "auto") -> torch.Tensor:
        return vae.encode_images(self, x, gens, tile)

    def preview(self, latents: torch.Tensor) -> list:
        return vae.latent_preview(self.cfg, latents)

    def eps_fn(self, cond, uncond, scale, concat=None, unet_call=None, tile="auto"):
        """The guided noise predictor ε(x, t) the samplers call (`kiln.pipeline.denoiser`); `unet_call(x, t, ctx)`
        replaces the UNet call (kiln.compat's tiled `apply_model`)."""
        call = None if unet_call is None else denoiser.external_call(unet_call)
        return denoiser.build(self, cond, uncond, scale, concat=concat, tile=tile, model_call=call)

    def load_lora(self, name_or_path):
        return lora.load_lora(self, name_or_path)

    def set_loras(self, loras) -> None:
        lora.set_loras(self, loras)

    def safety(self, pixels):
        """(pixels with flagged images blacked out, verdicts); unchanged and [] without a checker."""
        if self.safety_checker is None:
            return pixels, []
        from .safety import check_images

        r = check_images(self.safety_checker, pixels, self.device, self.dtype)
        return r.pixels, r.flagged

    @contextlib.contextmanager
    def seamless(self, on: bool = True):
        """Circular padding in every UNet and VAE convolution: the image tiles seamlessly with itself."""
        nets = [self.model, *(t.module for t in self.tiny_decoders.values())]
        convs = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
        old = [m.padding_mode for m in convs]
        try:
            for m in convs:
                m.padding_mode = "circular" if on else "zeros"
            yield
        finally:
            for m, mode in zip(convs, old):
                m.padding_mode = mode

    # ------------------------------------------------------------------ settings
    def compile(self, freeze: bool | None = None, backend: str = "torch") -> None:
        """torch.compile (`runtime.compile_model`), or `backend` "openvino" (`openvino_backend`; fp32 weights)."""
        if backend == "openvino":
            return runtime.compile_openvino(self)
        runtime.compile_model(self, freeze)

    def offload(self, mode: str | None) -> None:
        runtime.set_offload(self, mode)

    def attention_slicing(self, size: int | None) -> None:
        runtime.attention_slicing(self, size)

    def set_preview_decoder(self, spec: str | None) -> None:
        """Live previews (`Hooks.on_preview`) decoded at full size by a TAESD decoder: a file, a diffusers
        AutoencoderTiny folder, or "TAESD" (the model family's file in `vae_approx_dir`); None: off."""
        from .decoders import load_decoder

        self.preview_decoder = None if spec is None else load_decoder(self, spec, "preview decoder")

    def load_safety_checker(self, path) -> None:
        """Check every generated image with CompVis' safety checker (weights: a diffusers folder or file)."""
        from ..checkpoints.safety import load_safety_checker

        self.safety_checker = load_safety_checker(path, self.device, self.dtype)

    def set_refiner(self, refiner: Pipeline | None, switch: float = 0.8) -> None:
        """Generation hands the latent to `refiner` after `switch` of the steps (A1111's "Refiner switch at"); in
        img2img at the same step of the whole schedule, so at the same noise level."""
        if refiner is not None:
            if not 0.0 <= switch <= 1.0:
                raise KilnError(f"refiner switch must be between 0 and 1, got {switch}")
            if (refiner.cfg.latent_channels, refiner.cfg.scale_factor, refiner.cfg.downscale) != \
                    (self.cfg.latent_channels, self.cfg.scale_factor, self.cfg.downscale):
                raise KilnError(f"refiner {refiner.info.path}: its latent space ({refiner.cfg.family}) differs from "
                                f"the model's ({self.cfg.family})")
            if refiner.cfg.unet.in_channels != refiner.cfg.latent_channels:
                raise KilnError(f"refiner {refiner.info.path}: an inpainting model cannot be a refiner")
        self.refiner, self.refiner_switch = refiner, switch

    def set_deepcache(self, interval: int | None, depth: int = 3) -> None:
        """DeepCache-style feature reuse (`kiln.models.unet.FeatureCache`): the whole UNet runs every `interval`-th
        call, the calls between only its first `depth` input and last `depth` output blocks. None or 1: off.
        Faster and a different image: see docs/performance.md for the measured cost in prompt adherence."""
        if interval is None or interval == 1:
            self.deepcache = None
            return
        n = len(self.model.unet.input_blocks)
        if interval < 1:
            raise KilnError(f"DeepCache interval must be at least 1, got {interval}")
        if not 1 <= depth < n:
            raise KilnError(f"DeepCache depth must be between 1 and {n - 1} for this UNet, got {depth}")
        self.deepcache = (int(interval), int(depth))
