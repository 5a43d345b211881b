"""txt2img orchestration: the one code path that the CLI, the server and Ray all call.

    pipe = kiln.load("v1-5-pruned-emaonly.safetensors")
    result = pipe.txt2img("a red circle on a blue background", steps=20, seed=1)
    result.images[0].save("out.png")
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoints import LoadInfo, load_model
from .errors import KilnError
from .models.sd import LatentDiffusion, alphas_cumprod
from .models.unet import FeatureCache
from .prompts import CHUNK, chunk_tokens
from .samplers import (COMPVIS_DISCRETIZE, SAMPLERS, Discrete, ddim_timesteps, discrete_denoiser, get_sigmas,
                       model_default, resolve)
from .samplers.compvis import Known
from .tiling import tiled_cover
from .tokenizer import EOS, default_tokenizer

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


@dataclass
class Cond:
    """Text conditioning: the cross-attention context [B, n, C] and, for SDXL, the UNet's vector input [B, adm]."""
    context: torch.Tensor
    vector: torch.Tensor | None = None


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


def recorded_schedule(spec, schedule: str, model_default: str | None = None) -> str | None:
    """The schedule a generation records. DDIM and PLMS record it only when it or the model's default for them is
    not CompVis' uniform one, so infotexts of real checkpoints stay CompVis'/A1111's and an image made on a model
    whose default is quad (the embedded demo model's PLMS) regenerates with the discretization it was made with."""
    if spec.kind == "denoise" or schedule != "normal" or (model_default or "normal") != "normal":
        return schedule
    return None


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
        self.tile = "auto"
        self.safety_checker = None
        self._model_hash = None
        self.alphas_cumprod = alphas_cumprod(self.cfg)
        self.discrete = Discrete(self.alphas_cumprod)
        # one tokenizer per text encoder: the same BPE, but open_clip pads with 0 where OpenAI's CLIP repeats the end
        self.tokenizers = [default_tokenizer(0 if t.kind == "openclip" else EOS)
                           for t in (self.cfg.text, self.cfg.text2) if t is not None]
        self.tokenizer = self.tokenizers[0]
        self.lora_dir = None  # where <lora:name:w> tags are looked up
        self._lora_cache = {}
        self._lora_applied = ()
        self._lora_backup = {}
        self.embeddings_dir = None  # textual-inversion files, used in prompts by file name
        self.refiner = None  # a second Pipeline that finishes txt2img's last steps (SDXL refiner)
        self.refiner_switch = 0.8
        self._emb_cache = {}
        self._ti_used = {}
        self.offloader = None  # see `offload`
        self.deepcache = None  # (interval, depth): see `set_deepcache`

    # ------------------------------------------------------------------ building blocks
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts in A1111's language → [B, 77·chunks, C] hidden states (see `encode_prompts_pooled`)."""
        return self.encode_prompts_pooled(prompts, clip_skip)[0]

    @torch.no_grad()
    def encode_prompts_pooled(self, prompts: list[str], clip_skip: int = 1):
        """Prompts in A1111's language → ([B, 77·chunks, C] hidden states, pooled [B, P] or None).

        Each 75-token chunk is encoded on its own; emphasis multiplies the chunk's hidden states and then restores
        their mean (A1111's "Original" emphasis). Prompts with fewer chunks are padded with the empty prompt's.
        SDXL: the two encoders' states are concatenated (768 + 1280), and the pooled embedding (of each prompt's
        first chunk, as A1111) comes from the last encoder."""
        if clip_skip < 1 or clip_skip > self.max_clip_skip:
            raise KilnError(f"clip skip must be between 1 and {self.max_clip_skip}, got {clip_skip}")
        if self.cfg.text.max_position != CHUNK + 2:
            raise KilnError(f"the text encoder has {self.cfg.text.max_position} positions; prompts need {CHUNK + 2}")
        table, extras, owners = self._embedding_table()
        skip, final_norm = clip_skip - 1 + self.cfg.text_skip, self.cfg.text_final_norm
        states, pooled, per_prompt = [], None, None
        for k, (encoder, tok) in enumerate(zip(self.model.text_models, self.tokenizers)):
            try:  # the same chunks for every encoder; only the padding id may differ
                per_prompt = [chunk_tokens(tok, p, embeddings=table) for p in prompts]
            except ValueError as e:
                raise KilnError(str(e)) from None
            flat = [c for chunks in per_prompt for c in chunks]
            ids = torch.tensor([c.ids for c in flat], device=self.device)
            extra = extras.get(encoder.cfg.width)
            if self.cfg.is_sdxl and k == len(self.tokenizers) - 1:
                z, pool = encoder.hidden_and_pooled(ids, skip, final_norm, extra=extra)
                firsts = np.cumsum([0] + [len(c) for c in per_prompt[:-1]])
                pooled = pool[torch.as_tensor(firsts, device=pool.device)]
            else:
                z = encoder(ids, skip=skip, final_norm=final_norm, extra=extra)
            states.append(z)
        z = torch.cat(states, dim=-1)  # `flat`: the last encoder's chunks (the same for every encoder but padding)
        for c in flat:
            for i in c.ids:
                if i in owners:
                    self._ti_used[owners[i].name] = owners[i]
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
        return self._pad_chunks(out, clip_skip), pooled

    def _pad_chunks(self, hidden: list[torch.Tensor], clip_skip: int, length: int | None = None) -> torch.Tensor:
        length = length or max(h.shape[0] for h in hidden)
        if all(h.shape[0] == length for h in hidden):
            return torch.stack(hidden)
        empty = self.encode_prompts([""], clip_skip)[0]
        return torch.stack([torch.cat([h] + [empty] * ((length - h.shape[0]) // empty.shape[0])) for h in hidden])

    def _embedding_table(self):
        """Textual-inversion embeddings in `embeddings_dir` for `chunk_tokens`: ({name's token ids: the ids of its
        vectors (past the vocabulary)}, the vectors [n, width], {id: Embedding}). Files are read once (re-read
        when they change); embeddings of another width (another model family) are skipped with a notice."""
        from .checkpoints.embeddings import read_embedding, scan
        from .errors import CheckpointError

        if not self.embeddings_dir:
            return None, {}, {}
        widths, offset = self.cfg.context_widths, self.cfg.text.vocab_size
        table, vectors, owners = {}, {w: [] for w in widths}, {}
        for path in scan(self.embeddings_dir):
            key = (str(path), path.stat().st_mtime_ns)
            if key not in self._emb_cache:
                try:
                    self._emb_cache[key] = read_embedding(path)
                except CheckpointError as e:
                    self.notices.append(str(e))
                    self._emb_cache[key] = None
                emb = self._emb_cache[key]
                if emb is not None and not all(w in emb.vectors for w in widths):
                    self.notices.append(f"embedding {emb.name}: made for text encoders of width "
                                        f"{'/'.join(map(str, emb.vectors))}, this model's are "
                                        f"{'/'.join(map(str, widths))}: skipped")
            emb = self._emb_cache[key]
            if emb is None or not all(w in emb.vectors for w in widths):
                continue
            n = len(emb.vectors[widths[0]])
            if any(len(emb.vectors[w]) != n for w in widths):
                continue
            ids = list(range(offset, offset + n))
            offset += n
            table[tuple(self.tokenizer.encode(emb.name))] = ids
            for w in widths:
                vectors[w].append(emb.vectors[w])
            owners.update({i: emb for i in ids})
        extras = {w: torch.cat(v).to(self.device, self.dtype) for w, v in vectors.items() if v}
        return table, extras, owners

    def _ti_fields(self) -> dict:
        used = self._ti_used.values()
        return {"TI hashes": ", ".join(f"{e.name}: {e.short_hash}" for e in used)} if used else {}

    def conditioning(self, prompts: list[str], negative: list[str] | None, clip_skip: int = 1,
                     size: tuple[int, int] | None = None, aesthetic: tuple[float, float] = (6.0, 2.5)):
        """(cond, uncond) `Cond`s with a common sequence length (uncond None when guidance is off). SDXL also gets
        its vector conditioning for an image of `size` = (width, height) (default: native), uncropped; the refiner
        its aesthetic scores (positive, negative), diffusers' and A1111's defaults."""
        self._ti_used = {}
        cond, pooled = self.encode_prompts_pooled(prompts, clip_skip)
        w, h = size or (self.native_size, self.native_size)
        vec = lambda pool, score: None if pool is None else self.vector_conditioning(pool, h, w, aesthetic=score)
        if negative is None:
            return Cond(cond, vec(pooled, aesthetic[0])), None
        uncond, upooled = self.encode_prompts_pooled(negative, clip_skip)
        n = max(cond.shape[1], uncond.shape[1])
        return (Cond(self._pad_chunks(list(cond), clip_skip, n), vec(pooled, aesthetic[0])),
                Cond(self._pad_chunks(list(uncond), clip_skip, n), vec(upooled, aesthetic[1])))

    def vector_conditioning(self, pooled, height: int, width: int, crop=(0, 0), target=None, aesthetic=6.0):
        """SDXL's `y`: pooled text ⊕ sinusoidal embeddings (256 each, cos first) of the original size (h, w), the crop's
        top-left corner and the target size (base) or the aesthetic score (refiner)."""
        from .models.unet import timestep_embedding

        tail = [aesthetic] if self.cfg.text2 is None else list(target or (height, width))
        values = torch.tensor([height, width, *crop, *tail], dtype=torch.float32, device=pooled.device)
        emb = timestep_embedding(values, 256).reshape(1, -1).to(pooled.dtype)
        return torch.cat([pooled, emb.expand(pooled.shape[0], -1)], dim=-1)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], fp32; re-decodes in fp32 if half precision overflowed. Under --medvram and
        --lowvram one image at a time (the decoder's activations are then most of the device memory)."""
        if self.offloader is not None and z.shape[0] > 1:
            return torch.cat([self.decode_latents(one) for one in z.split(1)])
        vae = self.model.vae
        dec = vae.decode
        if self._tiled(z.shape[-2:]):  # tiles of twice the native size: the decoder's group norms see one tile
            ks = 2 * self.native_size // self.cfg.downscale
            dec = lambda t: tiled_cover(vae.decode, t, ks, ks * 3 // 4, uf=self.cfg.downscale)
        x = dec(z.to(self.dtype) / self.cfg.scale_factor)
        if not torch.isfinite(x).all() and self.dtype != torch.float32:
            self.notices.append("the VAE produced non-finite values in half precision; decoded in fp32 instead")
            vae.float()
            x = dec(z.float() / self.cfg.scale_factor)
            vae.to(self.dtype)
        return x.float()

    def _tiled(self, latent_hw) -> bool:
        """Tiles for the UNet and the VAE decoder: `tile` "on", "off", or "auto" = when the latent is more than
        twice the model's native size on a side (beyond what it was trained for, and where memory grows)."""
        if self.tile == "on":
            return True
        if self.tile == "off":
            return False
        return max(latent_hw) > 2 * (self.native_size // self.cfg.downscale)

    @contextlib.contextmanager
    def seamless(self, on: bool = True):
        """Circular padding in every UNet and VAE convolution: the image tiles seamlessly with itself."""
        convs = [m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
        old = [m.padding_mode for m in convs]
        try:
            for m in convs:
                m.padding_mode = "circular" if on else "zeros"
            yield
        finally:
            for m, mode in zip(convs, old):
                m.padding_mode = mode

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, gens=None) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (posterior sample with per-image generators, or the mean). Large
        images are encoded in tiles (see `_tiled`)."""
        f = self.cfg.downscale
        vae = self.model.vae
        if self._tiled((x.shape[-2] // f, x.shape[-1] // f)):
            ks = 2 * self.native_size
            both = tiled_cover(lambda t: torch.cat(vae.encode(t), dim=1), x.to(self.device, self.dtype), ks,
                               ks * 3 // 4, df=f)
            mean, logvar = both.chunk(2, dim=1)
        else:
            mean, logvar = vae.encode(x.to(self.device, self.dtype))
        if gens is None:
            return mean * self.cfg.scale_factor
        std = torch.exp(0.5 * logvar)
        return (mean + std * randn(mean.shape[1:], gens, self.device, mean.dtype)) * self.cfg.scale_factor

    def eps_fn(self, cond, uncond, scale, concat=None, unet_call=None):
        """The guided noise predictor the samplers call at step t (fractional t allowed): one batched UNet pass
        for [uncond, cond]. Takes and returns fp32; the UNet runs in the pipeline's dtype. `concat` (inpainting
        models: mask and masked-image latents) is appended to the UNet's input channels. `unet_call(x, t, ctx)`
        replaces the UNet call (kiln.compat's tiled `apply_model`)."""
        unet, disc, v_pred = self.model.unet, self.discrete, self.cfg.parameterization == "v"
        cond = cond if isinstance(cond, Cond) else Cond(cond)
        uncond = uncond if uncond is None or isinstance(uncond, Cond) else Cond(uncond)
        if uncond is None:
            ctx_all, y_all = cond.context, cond.vector
        else:
            ctx_all = torch.cat([uncond.context, cond.context])
            y_all = None if cond.vector is None else torch.cat([uncond.vector, cond.vector])

        ks = self.native_size // self.cfg.downscale

        cache = FeatureCache(*self.deepcache) if self.deepcache else None

        def run(xin, tt):
            if unet_call is not None:
                return unet_call(xin, tt, ctx_all)
            if self._tiled(xin.shape[-2:]):
                return tiled_cover(lambda z: unet(z, tt, ctx_all, y_all), xin, ks, ks * 3 // 4)
            return unet(xin, tt, ctx_all, y_all, cache=cache)

        def predict(x, t):
            b = x.shape[0]
            xin = x.to(self.dtype) if concat is None else torch.cat([x, concat], dim=1).to(self.dtype)
            if uncond is None:
                out = run(xin, torch.full((b,), float(t), device=self.device)).float()
            else:
                out_u, out_c = run(torch.cat([xin, xin]),
                                   torch.full((2 * b,), float(t), device=self.device)).float().chunk(2)
                out = out_u + scale * (out_c - out_u)
            if v_pred:  # v → ε, so that every sampler works on ε: ε = √ᾱ·v + √(1−ᾱ)·x
                a = disc.alpha_cumprod_at(t)
                out = a ** 0.5 * out + (1 - a) ** 0.5 * x
            return out

        return predict

    def sample(self, x, cond, uncond, cfg_scale, *, sampler, schedule, steps, eta, s_noise, gens, callback=None,
               init=None, strength=1.0, known_mask=None, concat=None, refiner=None):
        """Run one sampler from unit noise `x` (fp32) to a clean latent. Noise drawn while sampling comes from the
        images' own generators, so every image is reproducible on its own.

        img2img: `init` (clean latents) is noised to the level of the first of the last int(strength·steps) steps
        and only those run; strength 1 starts from pure noise, exactly as txt2img. `known_mask` (latent-sized, 1 = keep `init`) keeps the init where it is 1: DDIM/PLMS
        blend the re-noised init in before every step (CompVis), the other samplers see a denoiser whose estimate
        is the init there, so every step moves that region exactly towards it; both return the init there.

        `refiner` = (eps_fn of a second model, switch): this model runs the first `switch` fraction of the steps
        and the second one the rest, from the same noisy latent (SDXL's base + refiner)."""
        noise = lambda like: randn(like.shape[1:], gens, like.device, torch.float32)
        eps_fn = self.eps_fn(cond, uncond, cfg_scale, concat)
        split = None
        if refiner is not None:
            ref_eps, switch = refiner
            split = min(steps, max(0, round(switch * steps)))  # steps run by this model
            if split == steps:
                refiner = None

        def staged(cb, offset):
            return None if cb is None else (lambda i, n, *a: cb(i + offset, steps, *a))

        if sampler.kind == "eps":
            ac = self.alphas_cumprod
            known = Known(known_mask, init, ac.to(x.device), noise) if known_mask is not None else None
            discretize = COMPVIS_DISCRETIZE[schedule]
            start = None
            if init is not None and strength < 1.0:
                ts = ddim_timesteps(steps, len(ac), discretize)
                start = int(strength * len(ts))
                if start == 0:
                    return init
                a = ac[int(ts[start - 1])].item()  # noised to the level of the first step that runs (CompVis
                x = a ** 0.5 * init + (1 - a) ** 0.5 * x  # noised one sub-step higher: an off-by-one kiln fixes)
            kw = dict(eta=eta, noise=noise, known=known, discretize=discretize)
            if refiner is None:
                return sampler.fn(eps_fn, x, ac, steps, callback=callback, start=start, **kw)
            n = len(ddim_timesteps(steps, len(ac), discretize))
            stop = n - split
            if split:
                x = sampler.fn(eps_fn, x, ac, steps, callback=staged(callback, 0), start=start, stop=stop, **kw)
            return sampler.fn(ref_eps, x, ac, steps, callback=staged(callback, split), start=stop, **kw)
        sigmas = get_sigmas(self.discrete, schedule, steps)
        denoise = discrete_denoiser(eps_fn, self.discrete)
        if init is not None and strength < 1.0:
            t_enc = int(strength * steps)
            if t_enc == 0:
                return init
            sigmas = sigmas[steps - t_enc:]
            x = init + x * float(sigmas[0])
        else:
            x = x * float(sigmas[0])
        if known_mask is not None:
            inner = denoise
            denoise = lambda z, sigma: known_mask * init + (1 - known_mask) * inner(z, sigma)
        kw = dict(noise=noise, eta=eta, s_noise=s_noise)
        if refiner is None:
            return sampler.fn(denoise, x, sigmas, callback=callback, **kw)
        if split:
            x = sampler.fn(denoise, x, sigmas[:split + 1], callback=staged(callback, 0), **kw)
        return sampler.fn(discrete_denoiser(ref_eps, self.discrete), x, sigmas[split:],
                          callback=staged(callback, split), **kw)

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, name_or_path):
        """A LoRA by file path, or by name in `lora_dir` (read once, then cached)."""
        from .checkpoints.lora import LORA_SUFFIXES, find_lora, read_lora

        p = Path(str(name_or_path))
        path = p if p.suffix in LORA_SUFFIXES and p.is_file() else find_lora(str(name_or_path), self.lora_dir)
        key = str(path.resolve())
        if key not in self._lora_cache:
            lora = read_lora(path, [k for k, _ in self.model.named_parameters()], self.cfg.unet.num_res_blocks)
            if lora.unmatched:
                self.notices.append(f"LoRA {lora.name}: {len(lora.unmatched)} of its modules match no layer of "
                                    f"this model and were ignored")
            self._lora_cache[key] = lora
        return self._lora_cache[key]

    @torch.no_grad()
    def set_loras(self, loras) -> None:
        """Merge [(Lora, text-encoder weight, UNet weight)] into the weights: W + w · alpha/rank · up @ down.
        The previous set is removed first by restoring the original tensors (exact: no subtraction drift), so
        requests never leak LoRAs into each other."""
        from .checkpoints.lora import TE_PREFIXES

        want = tuple((lora.path, float(te), float(unet)) for lora, te, unet in loras)
        if want == self._lora_applied:
            return
        params = dict(self.model.named_parameters())
        for key, original in self._lora_backup.items():
            params[key].copy_(original)
        self._lora_backup, self._lora_applied = {}, ()
        for lora, te, unet in loras:
            for patch in lora.patches:
                w = te if patch.key.startswith(TE_PREFIXES) else unet
                if w == 0:
                    continue
                p = params[patch.key]
                if patch.key not in self._lora_backup:
                    self._lora_backup[patch.key] = p.detach().to("cpu", copy=True)
                target = p if patch.rows is None else p[patch.rows[0]:patch.rows[1]]
                target.add_((patch.delta(target.shape, torch.float32, p.device) * w).to(p.dtype))
        self._lora_applied = want
        if getattr(self, "_frozen", False):  # compiled graphs hold the old weights as constants
            torch._dynamo.reset()

    def _networks(self, batch, loras):
        """The batch's prompts without LoRA tags, with the LoRAs they name (and `loras`, [(file or name,
        weight)]) merged in; the infotext field naming them. Tags are read from the batch's first prompt."""
        from .prompts import extract_networks

        cleaned, tags = [], None
        for p in batch:
            try:
                text, found = extract_networks(p)
            except ValueError as e:
                raise KilnError(str(e)) from None
            cleaned.append(text)
            tags = found if tags is None else tags
        specs = [(self.load_lora(n), w, w) for n, w in (loras or [])]
        specs += [(self.load_lora(n), te, unet) for n, te, unet in tags or []]
        self.set_loras(specs)
        if not specs:
            return cleaned, {}
        return cleaned, {"Lora hashes": ", ".join(f"{lora.name}: {lora.short_hash}" for lora, _, _ in specs)}

    # ------------------------------------------------------------------ txt2img
    def check_size(self, width, height):
        unit = max(8, self.cfg.downscale)
        for name, v in (("width (--W)", width), ("height (--H)", height)):
            if v < unit or v % unit:
                raise KilnError(f"{name} must be a positive multiple of {unit}, got {v}")

    def _recorded_schedule(self, spec, sched):
        return recorded_schedule(spec, sched, model_default(spec, self.cfg.sampler_schedules))

    def _check_common(self, steps, batch_size, n_iter, sampler, schedule, eta):
        if batch_size < 1 or n_iter < 1:
            raise KilnError(f"n_samples and n_iter must be at least 1 (got {batch_size} and {n_iter})")
        if steps < 1 or steps > 1000:
            raise KilnError(f"steps must be between 1 and 1000, got {steps}")
        try:
            spec, sched = resolve(sampler, schedule, defaults=self.cfg.sampler_schedules)
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

    def compile(self, freeze: bool | None = None) -> None:
        """torch.compile the UNet and the VAE decoder in place (dynamic=False: one graph per image size; the
        first call at a size compiles, inductor's on-disk cache shortens it in later processes). Parameter names
        and state dicts are unaffected.

        `freeze` (default: on CPUs) turns on inductor's freezing: weights become constants pre-packed for oneDNN,
        which is most of compile's gain on a CPU, at the cost of a second, pre-packed copy of the weights. A frozen
        graph does not see weight changes, so LoRA changes reset the compiled code (the next call recompiles)."""
        import torch._inductor.config as inductor

        if self.offloader is not None:
            raise KilnError("--compile and --medvram/--lowvram do not go together (compiled graphs keep the weights)")
        from .models.conv import prepack

        prepack(self.model, False)  # compiled code packs (or fuses) for itself; drop eager packed copies
        self._frozen = self.device.type == "cpu" if freeze is None else freeze
        inductor.freezing = self._frozen
        self.model.unet.compile(dynamic=False)
        self.model.vae.decoder.compile(dynamic=False)

    def offload(self, mode: str | None) -> None:
        """`mode` "medvram" or "lowvram" (A1111's flags, `kiln.offload`): the weights stay in CPU memory and each part
        of the model moves to the device only while it runs. None: everything back on the device."""
        from .offload import MODES, offload

        if mode not in (None, *MODES):
            raise KilnError(f"offload mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode and getattr(self, "_frozen", None) is not None:
            raise KilnError("--medvram/--lowvram and --compile do not go together (compiled graphs keep the weights)")
        if self.offloader is not None:
            self.offloader.remove()
            self.offloader = None
        if mode:
            self.model.to("cpu")
            self.offloader = offload(self.model, self.device, mode)

    def set_deepcache(self, interval: int | None, depth: int = 3) -> None:
        """DeepCache-style feature reuse (`kiln.models.unet.FeatureCache`): the whole UNet runs every `interval`-th
        call, the calls between only its first `depth` input and last `depth` output blocks. None or 1: off.
        Faster (the more so the larger `interval` and the smaller `depth`) and a different image: see
        docs/performance.md for the measured cost in prompt adherence."""
        if interval is None or interval == 1:
            self.deepcache = None
            return
        n = len(self.model.unet.input_blocks)
        if interval < 1:
            raise KilnError(f"DeepCache interval must be at least 1, got {interval}")
        if not 1 <= depth < n:
            raise KilnError(f"DeepCache depth must be between 1 and {n - 1} for this UNet, got {depth}")
        self.deepcache = (int(interval), int(depth))

    def attention_slicing(self, size: int | None) -> None:
        """UNet attention over at most `size` queries at a time (None: all). PyTorch's SDPA already runs in
        bounded memory on CUDA and CPUs; this is for backends where it falls back to the N×N kernel (some MPS
        versions), at a small speed cost. Results are identical up to float summation order."""
        from .models.unet import CrossAttention

        if size is not None and size < 1:
            raise KilnError(f"attention slice size must be at least 1, got {size}")
        for m in self.model.unet.modules():
            if isinstance(m, CrossAttention):
                m.slice_size = size

    def set_refiner(self, refiner: "Pipeline | None", switch: float = 0.8) -> None:
        """txt2img hands the latent to `refiner` after `switch` of the steps (A1111's "Refiner switch at")."""
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

    def _variation(self, subseed, strength, resize_from):
        """A function seeds → (subseeds, strength, resize_from in latent pixels) for `start_noise`."""
        if not 0.0 <= strength <= 1.0:
            raise KilnError(f"variation strength must be between 0 and 1, got {strength}")
        if strength and subseed is None:
            raise KilnError("a variation strength needs a variation seed (subseed)")
        lat = None
        if resize_from is not None:
            w, h = resize_from
            self.check_size(w, h)
            lat = (h // self.cfg.downscale, w // self.cfg.downscale)
        return lambda seeds: ([subseed + i for i in range(len(seeds))] if strength else None, strength, lat)

    def _extra_fields(self, params) -> dict:
        """A1111's infotext keys for variations, tiling and hires fix."""
        f = {}
        if params.get("subseed_strength"):
            f["Variation seed"] = params["subseed"]
            f["Variation seed strength"] = _fmt(params["subseed_strength"])
        if params.get("seed_resize_from"):
            f["Seed resize from"] = "{}x{}".format(*params["seed_resize_from"])
        if params.get("seamless"):
            f["Tiling"] = "True"
        if self.deepcache:
            f["DeepCache interval"], f["DeepCache depth"] = self.deepcache
        if params.get("hires_scale"):
            f["Denoising strength"] = _fmt(params["hires_strength"])
            f["Hires upscale"] = _fmt(params["hires_scale"])
            f["Hires steps"] = params["hires_steps"]
            f["Hires upscaler"] = {"latent": "Latent", "lanczos": "Lanczos"}[params["hires_upscaler"]]
        return f

    def _hires(self, z, size, upscaler, cond, uncond, cfg_scale, spec, sched, steps, eta, s_noise, gens, strength):
        """Upscale a finished latent to `size` (pixels) and re-render it there (A1111's hires fix)."""
        w, h = size
        lat = (h // self.cfg.downscale, w // self.cfg.downscale)
        if upscaler == "latent":
            init = torch.nn.functional.interpolate(z, size=lat, mode="bilinear", align_corners=False)
        else:
            px = to_uint8(self.decode_latents(z))
            big = np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.LANCZOS)) for p in px])
            init = self.encode_images(torch.from_numpy(big).permute(0, 3, 1, 2).float() / 127.5 - 1.0).float()
        noise = randn((z.shape[1], *lat), gens, self.device)
        return self.sample(noise, cond, uncond, cfg_scale, sampler=spec, schedule=sched, steps=steps, eta=eta,
                           s_noise=s_noise, gens=gens, init=init, strength=strength)

    def txt2img_iter(self, prompt: str | list[str] = "", *, negative_prompt: str = "", steps: int = 50,
                     sampler: str = "ddim", schedule: str | None = None, cfg_scale: float = 7.5,
                     width: int | None = None, height: int | None = None, seed: int = 42, batch_size: int = 1,
                     n_iter: int = 1, eta: float | None = None, s_noise: float = 1.0, clip_skip: int = 1,
                     fixed_code: bool = False, progress: bool = False, callback=None,
                     preview_every: int = 0, on_preview=None, preview_full: bool = False,
                     subseed: int | None = None, subseed_strength: float = 0.0, seed_resize_from=None,
                     seamless: bool = False, tile: str = "auto", hires_scale: float | None = None,
                     hires_upscaler: str = "latent", hires_steps: int | None = None, hires_strength: float = 0.7,
                     loras=None):
        """Yields one `Result` per batch. `prompt` as a list gives the batches' prompts in order
        (chunked by `batch_size`, the last chunk may be short), as CompVis' `--from-file` does.

        `sampler`/`schedule` take our names or A1111's ("DPM++ 2M Karras"); `eta` None is the sampler's default.
        `callback(i, total, x, pred_x0)` runs after every step; `on_preview(i, total, images, seeds)` every
        `preview_every` steps with cheap previews of pred_x0 (VAE-decoded with `preview_full`).

        Variations (A1111): `subseed` (image i uses subseed + i) mixed in by `subseed_strength`; `seed_resize_from`
        = (width, height) keeps a seed's composition at another size. `seamless` makes tileable images; `tile`
        ("auto", "on", "off") runs the UNet and the decoder in overlapping tiles. Hires fix: generate, upscale by
        `hires_scale` ("latent" or "lanczos"), then img2img at `hires_strength` for `hires_steps`.

        LoRAs: `<lora:name:weight>` tags in the prompt (looked up in `lora_dir`) and `loras` = [(file or name,
        weight)] are merged into the weights for the batch and removed afterwards."""
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
        variation = self._variation(subseed, subseed_strength, seed_resize_from)
        hires = None
        if hires_scale is not None:
            if hires_upscaler not in ("latent", "lanczos"):
                raise KilnError(f"hires upscaler must be latent or lanczos, not {hires_upscaler!r}")
            if not 0.0 <= hires_strength <= 1.0 or hires_scale <= 0:
                raise KilnError("hires strength must be in [0, 1] and the hires scale positive")
            unit = max(8, self.cfg.downscale)
            hires = (int(width * hires_scale) // unit * unit, int(height * hires_scale) // unit * unit)
            self.check_size(*hires)
        params = dict(steps=steps, sampler=spec.name, schedule=self._recorded_schedule(spec, sched),
                      cfg_scale=cfg_scale, width=width, height=height, negative_prompt=negative_prompt, eta=eta,
                      s_noise=s_noise, clip_skip=clip_skip, batch_size=batch_size, n_iter=n_iter,
                      fixed_code=fixed_code, precision=self.precision, ema=self.info.ema_used,
                      subseed=subseed, subseed_strength=subseed_strength, seed_resize_from=seed_resize_from,
                      seamless=seamless, hires_scale=hires_scale, hires_upscaler=hires_upscaler,
                      hires_steps=hires_steps, hires_strength=hires_strength)
        extra = self._extra_fields(params)
        if self.refiner is not None:
            r = self.refiner
            extra["Refiner"] = f"{r.model_name} [{r.model_hash[:10]}]" if r.model_hash else r.model_name
            extra["Refiner switch at"] = _fmt(self.refiner_switch)
            params.update(refiner=r.info.path, refiner_switch=self.refiner_switch)
        self.tile = tile
        index, first_codes = 0, None
        for _ in range(n_iter):
            for batch in batches:
                seeds = [seed + index + j for j in range(len(batch))]
                index += len(batch)
                x, gens = start_noise(shape, seeds, self.device, *variation(seeds))
                if fixed_code:
                    first_codes = x if first_codes is None else first_codes
                    x = first_codes[: len(batch)]
                clean, lora_fields = self._networks(batch, loras)
                with torch.no_grad():
                    cond, uncond = self.conditioning(
                        clean, [negative_prompt] * len(batch) if cfg_scale != 1.0 else None, clip_skip,
                        size=(width, height))
                    refine = None
                    if self.refiner is not None:
                        r = self.refiner
                        rc, ru = r.conditioning(clean, [negative_prompt] * len(batch) if cfg_scale != 1.0 else None,
                                                min(clip_skip, r.max_clip_skip), size=(width, height))
                        refine = (r.eps_fn(rc, ru, cfg_scale), self.refiner_switch)
                    bar = tqdm(total=steps, desc="sampling", unit="step", disable=not progress, leave=False)
                    on_step = self._step_callback(bar, callback, preview_every, on_preview, preview_full, seeds)
                    with self.seamless(seamless):
                        z = self.sample(x, cond, uncond, cfg_scale, sampler=spec, schedule=sched, steps=steps,
                                        eta=eta, s_noise=s_noise, gens=gens, callback=on_step, refiner=refine)
                        if hires is not None:
                            z = self._hires(z, hires, hires_upscaler, cond, uncond, cfg_scale, spec, sched,
                                            hires_steps or steps, eta, s_noise, gens, hires_strength)
                        bar.close()
                        pixels, flagged = self._safety(to_uint8(self.decode_latents(z)))
                # A1111 records the batch so that an image can be regenerated bit for bit (batch size changes
                # the kernels' summation order, hence the last bit of some pixels).
                infos = [self.infotext(params, p, sd, {**extra, **lora_fields, **self._ti_fields(),
                                                       **({"Batch size": len(batch), "Batch pos": j}
                                                          if len(batch) > 1 else {})})
                         for j, (p, sd) in enumerate(zip(batch, seeds))]
                yield Result([Image.fromarray(p) for p in pixels], seeds, list(batch), params, z, pixels, infos,
                             flagged)

    # ------------------------------------------------------------------ img2img / inpainting
    def prepare_init(self, init_image, width=None, height=None, resize_mode="just-resize", mask=None,
                     outpaint=None):
        """(RGB init image at the generation size, mask [H, W] float or None). Without width/height the image's
        own size is used, rounded down to a multiple of 8 (with a notice). `outpaint` = (left, right, top,
        bottom) extends the canvas and masks the new area."""
        from .images import fit, load_image, load_mask, model_size, outpaint_canvas

        im = load_image(init_image, "init image")
        m = None
        if mask is not None:
            m = load_mask(mask, im.size, self.notices)
        if outpaint is not None:
            im, new_area = outpaint_canvas(im, *outpaint)
            if m is not None:
                m = np.maximum(np.pad(m, ((outpaint[2], outpaint[3]), (outpaint[0], outpaint[1]))), new_area)
            else:
                m = new_area
        unit = max(8, self.cfg.downscale)
        if width is None and height is None:
            width, height = model_size(im.width, im.height, unit)
            if (width, height) != im.size:
                self.notices.append(f"the init image is {im.width}x{im.height}; resized to {width}x{height} "
                                    f"(sizes must be multiples of {unit})")
        else:
            width = width or round(im.width * height / im.height / unit) * unit
            height = height or round(im.height * width / im.width / unit) * unit
        self.check_size(width, height)
        im = fit(im, width, height, resize_mode)
        if m is not None:
            m_im = fit(Image.fromarray((m * 255).astype(np.uint8)).convert("RGB"), width, height, resize_mode)
            m = np.asarray(m_im.convert("L"), dtype=np.float32) / 255.0
        return im, m

    def img2img_iter(self, prompt: str | list[str], init_image, *, strength: float = 0.75, mask=None,
                     mask_blur: float = 4.0, inpaint_fill: str = "original", outpaint=None,
                     inpaint_area: str = "whole", masked_padding: int = 32,
                     negative_prompt: str = "", steps: int = 50, sampler: str = "ddim", schedule: str | None = None,
                     cfg_scale: float = 5.0, width: int | None = None, height: int | None = None,
                     resize_mode: str = "just-resize", seed: int = 42, batch_size: int = 1, n_iter: int = 1,
                     eta: float | None = None, s_noise: float = 1.0, clip_skip: int = 1, fixed_code: bool = False,
                     progress: bool = False, callback=None, preview_every: int = 0, on_preview=None,
                     preview_full: bool = False, subseed: int | None = None, subseed_strength: float = 0.0,
                     seed_resize_from=None, seamless: bool = False, tile: str = "auto", loras=None):
        """img2img (and, with `mask` — white = repaint — or `outpaint`, inpainting): the init image is encoded,
        noised to `strength` and denoised with the prompt. Inpainting keeps the unmasked area: in latent space
        while sampling, and in pixels at the end (the original pixels pasted back through the mask blurred by
        `mask_blur` pixels). `inpaint_fill`: original | fill | latent-noise | latent-nothing (what the masked area
        starts from; fill = painted with the colours around it). `inpaint_area="masked"` works on a crop around the mask (grown by `masked_padding` pixels to
        the output's aspect ratio) rendered at the full output size and pasted back: more detail for small masks
        (A1111's "only masked"). Models with a 9-channel UNet (inpainting checkpoints) get the mask and the masked image as
        extra input channels and are best used at strength 1."""
        from .images import blur_mask

        if not 0.0 <= strength <= 1.0:
            raise KilnError(f"strength must be between 0 and 1, got {strength}")
        if inpaint_fill not in FILLS:
            raise KilnError(f"inpaint fill must be one of {', '.join(FILLS)}, not {inpaint_fill!r}")
        spec, sched, eta = self._check_common(steps, batch_size, n_iter, sampler, schedule, eta)
        if inpaint_area not in ("whole", "masked"):
            raise KilnError(f"inpaint area must be whole or masked, not {inpaint_area!r}")
        only_masked = inpaint_area == "masked" and (mask is not None or outpaint is not None)
        region = None
        if only_masked:  # the picture keeps its own size; width/height are the crop's rendering size
            from .images import mask_region

            init_im, m = self.prepare_init(init_image, None, None, resize_mode, mask, outpaint)
            width, height = width or self.native_size, height or self.native_size
            self.check_size(width, height)
            region = mask_region(m, masked_padding, width, height)
            full_px, full_paste = np.asarray(init_im), blur_mask(m, mask_blur)
            m_crop = Image.fromarray((m * 255).astype(np.uint8)).crop(region).resize((width, height), Image.BILINEAR)
            init_im = init_im.crop(region).resize((width, height), Image.LANCZOS)
            m = np.asarray(m_crop, dtype=np.float32) / 255.0
        else:
            init_im, m = self.prepare_init(init_image, width, height, resize_mode, mask, outpaint)
            width, height = init_im.size
        nine = self.cfg.unet.in_channels != self.cfg.latent_channels
        if nine and m is None:
            raise KilnError(f"{self.info.path} is an inpainting model: it needs a mask (--mask) or --outpaint")
        init_px = enc_px = np.array(init_im)
        if m is not None and inpaint_fill == "fill":  # the sampler starts from the hole painted with its surroundings
            from .images import fill_masked

            enc_px = fill_masked(init_px, m)
        x_img = torch.from_numpy(enc_px).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            z0 = self.encode_images(x_img).float()  # the posterior mean: strength 0 gives the VAE round trip
        lat_hw = z0.shape[-2:]
        known = concat = None
        paste = None
        if m is not None:
            paste = blur_mask(m, mask_blur)  # pixel-space blend weights (1 = generated)
            m_lat = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=lat_hw, mode="bilinear",
                                                    align_corners=False)
            repaint = (m_lat > 0.5).float() if nine else m_lat.clamp(0, 1)
            known = (1 - repaint).to(self.device)
            if nine:  # the model's own conditioning: binarised mask ⊕ latents of the image with the hole blanked
                hard = torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]
                with torch.no_grad():
                    masked = self.encode_images(x_img * (1 - hard)).float()
                concat = torch.cat([torch.nn.functional.interpolate(hard, size=lat_hw), masked.cpu()], dim=1)
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise KilnError("no prompts given")
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        params = dict(steps=steps, sampler=spec.name, schedule=self._recorded_schedule(spec, sched),
                      cfg_scale=cfg_scale, width=width, height=height, negative_prompt=negative_prompt, eta=eta,
                      s_noise=s_noise, clip_skip=clip_skip, batch_size=batch_size, n_iter=n_iter,
                      fixed_code=fixed_code, precision=self.precision, ema=self.info.ema_used, strength=strength,
                      mask_blur=mask_blur if m is not None else None,
                      inpaint_fill=inpaint_fill if m is not None else None, resize_mode=resize_mode,
                      inpaint_area=inpaint_area if m is not None else None,
                      subseed=subseed, subseed_strength=subseed_strength, seed_resize_from=seed_resize_from,
                      seamless=seamless)
        variation = self._variation(subseed, subseed_strength, seed_resize_from)
        var_fields = self._extra_fields(params)
        self.tile = tile
        index, first_codes = 0, None
        for _ in range(n_iter):
            for batch in batches:
                n = len(batch)
                seeds = [seed + index + j for j in range(n)]
                index += n
                x, gens = start_noise(tuple(z0.shape[1:]), seeds, self.device, *variation(seeds))
                if fixed_code:
                    first_codes = x if first_codes is None else first_codes
                    x = first_codes[:n]
                init = z0.to(self.device).expand(n, -1, -1, -1).clone()
                if m is not None and inpaint_fill not in ("original", "fill"):
                    hole = (1 - known).expand_as(init)
                    fill = randn(z0.shape[1:], gens, self.device) if inpaint_fill == "latent-noise" \
                        else torch.zeros_like(init)
                    init = init * (1 - hole) + fill * hole
                clean, lora_fields = self._networks(batch, loras)
                with torch.no_grad():
                    cond, uncond = self.conditioning(clean, [negative_prompt] * n if cfg_scale != 1.0 else None,
                                                     clip_skip, size=(z0.shape[-1] * self.cfg.downscale,
                                                                      z0.shape[-2] * self.cfg.downscale))
                    bar = tqdm(total=steps, desc="sampling", unit="step", disable=not progress, leave=False)
                    on_step = self._step_callback(bar, callback, preview_every, on_preview, preview_full, seeds)
                    c = None if concat is None else concat.to(self.device).expand(n, -1, -1, -1)
                    with self.seamless(seamless):
                        z = self.sample(x, cond, uncond, cfg_scale, sampler=spec, schedule=sched, steps=steps, eta=eta,
                                        s_noise=s_noise, gens=gens, callback=on_step, init=init, strength=strength,
                                        known_mask=None if (known is None or nine) else known.expand_as(init),
                                        concat=c)
                        bar.close()
                        pixels = to_uint8(self.decode_latents(z))
                    if paste is not None:  # the original pixels outside the (blurred) mask, exactly
                        w = paste[None, :, :, None]
                        pixels = np.clip(w * pixels + (1 - w) * init_px[None] + 0.5, 0, 255).astype(np.uint8) \
                            if mask_blur > 0 else np.where(w > 0.5, pixels, init_px[None]).astype(np.uint8)
                    if region is not None:  # back into the whole picture, through the whole mask
                        x0, y0, x1, y1 = region
                        w = full_paste[y0:y1, x0:x1, None]
                        out = []
                        for p in pixels:
                            small = np.asarray(Image.fromarray(p).resize((x1 - x0, y1 - y0), Image.LANCZOS))
                            full = full_px.astype(np.float64).copy()
                            full[y0:y1, x0:x1] = w * small + (1 - w) * full[y0:y1, x0:x1]
                            out.append(np.clip(full + 0.5, 0, 255).astype(np.uint8))
                        pixels = np.stack(out)
                    pixels, flagged = self._safety(pixels)
                extra = {"Denoising strength": _fmt(strength), "Mask blur": _fmt(mask_blur) if m is not None else None,
                         "Inpaint area": "Only masked" if region is not None else None,
                         "Masked area padding": masked_padding if region is not None else None, **var_fields}
                infos = [self.infotext(params, p, sd, {**extra, **lora_fields, **self._ti_fields(),
                                                       **({"Batch size": n, "Batch pos": j} if n > 1 else {})})
                         for j, (p, sd) in enumerate(zip(batch, seeds))]
                yield Result([Image.fromarray(p) for p in pixels], seeds, list(batch), params, z, pixels, infos,
                             flagged)

    def img2img(self, prompt: str | list[str], init_image, **kw) -> Result:
        return _join(list(self.img2img_iter(prompt, init_image, **kw)))

    def txt2img(self, prompt: str | list[str] = "", **kw) -> Result:
        """All batches of `txt2img_iter` in one Result."""
        return _join(list(self.txt2img_iter(prompt, **kw)))


FILLS = ("original", "fill", "latent-noise", "latent-nothing")


def _fmt(v: float) -> str:
    return f"{v:g}"


def _join(parts: list[Result]) -> Result:
    return Result([im for r in parts for im in r.images], [s for r in parts for s in r.seeds],
                      [p for r in parts for p in r.prompts], parts[0].params,
                      torch.cat([r.latents for r in parts]), np.concatenate([r.pixels for r in parts]),
                      [t for r in parts for t in r.infotexts], [f for r in parts for f in r.flagged])


def load(path: str | Path, *, device: str = "auto", precision: str = "full", ema: str = "auto",
         vae: str | None = None, config: str | None = None, prediction: str | None = None,
         channels_last: bool | None = None, prepack: bool | str = "auto", offload: str | None = None) -> Pipeline:
    """Load a checkpoint (CompVis file or diffusers folder) into a ready Pipeline. `prediction` ("eps" | "v")
    overrides the detected parameterization (SD 2.x files carry no such fact). `channels_last` (default: on
    CUDA) stores the UNet's and VAE's convolution weights NHWC, which cuDNN and oneDNN run faster; results differ
    from NCHW only by float summation order. Not the CPU default: there the weights stay in the file's memory map
    (no copy, fast load), and NHWC copies would add 2.7 GB of resident memory for a 10% faster UNet
    (docs/performance.md). `prepack` (CPU, fp32) packs the convolution weights for oneDNN at the first call at an
    image size (`kiln.models.conv`): "auto" where memory stays flat (weights memory-mapped from an fp32 file), True
    everywhere, False never (PyTorch's plain eager convolution). `offload` ("medvram" |
    "lowvram") keeps the weights in CPU memory and moves each part to the GPU while it runs (`Pipeline.offload`);
    on a CPU there is nothing to offload, and it is ignored with a notice."""
    dev = pick_device(device)
    dtype = compute_dtype(precision, dev)
    nhwc = channels_last if channels_last is not None else dev.type == "cuda"
    notices = []
    if offload and dev.type == "cpu":
        notices.append(f"--{offload}: the model runs on the CPU, so there is nothing to offload; ignored")
        offload = None
    model, info = load_model(path, ema=ema, vae=vae, config_yaml=config, prediction=prediction, dtype=dtype,
                             device="cpu" if offload else dev, channels_last=nhwc)
    if prepack != "auto":
        from .models.conv import prepack as set_prepack

        set_prepack(model, prepack)
    pipe = Pipeline(model, info, dev, dtype, precision, notices=notices)
    if offload:
        pipe.offload(offload)
    return pipe


__all__ = ["Pipeline", "Result", "load", "pick_device", "compute_dtype", "SAMPLERS"]
