"""`GenerationParams`: every parameter of a generation, with one set of defaults for every front end, checked
against the loaded model in one place, and recorded (infotext, JSON) from one place.

The CLI, the HTTP API, `kiln batch` and `--from-png` all build one of these; a new parameter is one field here
(plus its line in `record` and, if A1111 has it, in `infotext_fields`/`from_infotext`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import KilnError
from ..samplers import MAX_STEPS, model_default, resolve
from .decoders import TAESD, load_decoder
from .vae import TILES

FILLS = ("original", "fill", "latent-noise", "latent-nothing")
AREAS = ("whole", "masked")
HIRES_UPSCALERS = ("latent", "lanczos", "nearest")  # and any upscaler of `pipe.upscalers` by name
MODE_CFG_SCALE = {"txt2img": 7.5, "img2img": 5.0}  # CompVis' scripts' defaults


@dataclass
class GenerationParams:
    prompt: str | list[str] = ""  # a list: the batches' prompts in order (CompVis' --from-file)
    negative_prompt: str = ""
    steps: int = 50
    sampler: str = "ddim"  # our name or A1111's ("DPM++ 2M Karras")
    schedule: str | None = None  # None: the sampler's (or the model's) default
    cfg_scale: float | None = None  # None: 7.5 for txt2img, 5.0 with an init image (CompVis' scripts)
    width: int | None = None  # None: the model's native size, or the init image's
    height: int | None = None
    seed: int = 42  # image i of the run uses seed + i
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None  # None: the sampler's default
    s_noise: float = 1.0
    clip_skip: int = 1
    fixed_code: bool = False  # every iteration starts from the first one's noise
    subseed: int | None = None  # A1111's variation seed (image i uses subseed + i)
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height)
    seamless: bool = False
    tile: str = "auto"  # UNet and VAE in overlapping tiles: auto | on | off
    hires_scale: float | None = None  # hires fix (txt2img): upscale by this, then re-render
    hires_upscaler: str = "latent"
    hires_steps: int | None = None
    hires_strength: float = 0.7
    loras: list = field(default_factory=list)  # [(file or name, weight)], besides <lora:…> tags in the prompt
    watermark: bool | str = True  # the invisible watermark: True the model's text, a text, or False for none
    controlnets: list = field(default_factory=list)  # [kiln.pipeline.control.ControlUnit], applied in order
    decoder: str | None = None  # the final decode: None the model's VAE; a TAESD file, or "TAESD" (decoders.py)
    # img2img and inpainting: with an init image
    init_image: Any = None  # a path or a PIL image
    strength: float = 0.75
    mask: Any = None  # white = repaint
    mask_blur: float = 4.0
    inpaint_fill: str = "original"
    outpaint: tuple[int, int, int, int] | None = None  # pixels added left, right, top, bottom
    inpaint_area: str = "whole"  # masked: A1111's "only masked"
    masked_padding: int = 32
    resize_mode: str = "just-resize"

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_image is None else "img2img"

    @property
    def inpainting(self) -> bool:
        return self.mask is not None or self.outpaint is not None

    @property
    def scale(self) -> float:
        return MODE_CFG_SCALE[self.mode] if self.cfg_scale is None else self.cfg_scale

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def make(cls, **kw) -> GenerationParams:
        """From keyword arguments, with a clear error for one that is not a parameter."""
        unknown = sorted(set(kw) - set(cls.names()))
        if unknown:
            raise KilnError(f"unknown generation parameter(s): {', '.join(unknown)}")
        return cls(**kw)

    def watermark_text(self, cfg) -> str | None:
        """The text of the invisible watermark to add, or None: the model's (`cfg.watermark`) unless asked for."""
        return cfg.watermark if self.watermark is True else (self.watermark or None)


SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def scalar_fields() -> dict[str, type]:
    """{field: its type} for the fields that hold one str, int, float or bool (None aside): what a row of a
    prompts file, a form or a query string can set."""
    out = {}
    for f in fields(GenerationParams):
        parts = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
        if parts and parts[0] in SCALARS:
            out[f.name] = SCALARS[parts[0]]
    return out


@dataclass
class Checked:
    """What `check` resolved: the sampler, its schedule and eta, the batches of prompts, the hires size."""
    spec: Any
    schedule: str
    eta: float
    batches: list
    variation: Any
    hires: tuple[int, int] | None = None
    decoder: Any = None  # the loaded TAESD decoder (`decoders.load_decoder`), or None: the VAE


def size_unit(cfg) -> int:
    return max(8, cfg.downscale)


def check_size(cfg, width, height):
    unit = size_unit(cfg)
    for name, v in (("width (--W)", width), ("height (--H)", height)):
        if v < unit or v % unit:
            raise KilnError(f"{name} must be a positive multiple of {unit}, got {v}")


def check(p: GenerationParams, pipe) -> Checked:
    """Validate `p` against the loaded model (the messages users see); sizes of img2img are checked when the
    init image is read."""
    cfg = pipe.cfg
    if p.mode == "img2img":
        _check_img2img(p, pipe)
    elif cfg.unet.in_channels != cfg.latent_channels:
        raise KilnError(f"{pipe.info.path} is an inpainting model ({cfg.unet.in_channels}-channel UNet); "
                        "txt2img needs an ordinary checkpoint")
    else:
        check_size(cfg, p.width or pipe.native_size, p.height or pipe.native_size)
    if p.batch_size < 1 or p.n_iter < 1:
        raise KilnError(f"n_samples and n_iter must be at least 1 (got {p.batch_size} and {p.n_iter})")
    if p.steps < 1 or p.steps > 1000:
        raise KilnError(f"steps must be between 1 and 1000, got {p.steps}")
    try:
        spec, sched = resolve(p.sampler, p.schedule, defaults=cfg.sampler_schedules)
    except ValueError as e:
        raise KilnError(str(e)) from None
    eta = (spec.eta or 0.0) if p.eta is None else p.eta
    if eta and spec.eta is None:
        raise KilnError(f"the {spec.name} sampler is deterministic and has no eta (got {eta})")
    if eta < 0 or (spec.eta_max is not None and eta > spec.eta_max):
        raise KilnError(f"eta must be between 0 and {spec.eta_max:g} for {spec.name}, got {eta}"
                        if spec.eta_max is not None else f"eta must be >= 0, got {eta}")
    most = MAX_STEPS.get(sched)
    if most is not None and max(p.steps, p.hires_steps or 0) > most:
        raise KilnError(f"the {sched} schedule has at most {most} steps, got {max(p.steps, p.hires_steps or 0)}")
    if isinstance(p.watermark, str) and not p.watermark.strip():
        raise KilnError("the watermark text must not be empty (switch the watermark off instead)")
    if p.tile not in TILES:
        raise KilnError(f"tile must be one of {', '.join(TILES)}, not {p.tile!r}")
    prompts = [p.prompt] * p.batch_size if isinstance(p.prompt, str) else list(p.prompt)
    if not prompts:
        raise KilnError("no prompts given")
    batches = [prompts[i:i + p.batch_size] for i in range(0, len(prompts), p.batch_size)]
    decoder = load_decoder(pipe, p.decoder) if p.decoder else None
    return Checked(spec, sched, float(eta), batches, _variation(p, cfg), _hires_size(p, pipe), decoder)


def _check_img2img(p, pipe):
    if not 0.0 <= p.strength <= 1.0:
        raise KilnError(f"strength must be between 0 and 1, got {p.strength}")
    if p.inpaint_fill not in FILLS:
        raise KilnError(f"inpaint fill must be one of {', '.join(FILLS)}, not {p.inpaint_fill!r}")
    if p.inpaint_area not in AREAS:
        raise KilnError(f"inpaint area must be whole or masked, not {p.inpaint_area!r}")
    if p.hires_scale is not None:
        raise KilnError("hires fix is for txt2img; for img2img, ask for the larger size directly")


def _variation(p, cfg):
    """A function seeds → (subseeds, strength, resize_from in latent pixels) for `start_noise`."""
    if not 0.0 <= p.subseed_strength <= 1.0:
        raise KilnError(f"variation strength must be between 0 and 1, got {p.subseed_strength}")
    if p.subseed_strength and p.subseed is None:
        raise KilnError("a variation strength needs a variation seed (subseed)")
    lat = None
    if p.seed_resize_from is not None:
        w, h = p.seed_resize_from
        check_size(cfg, w, h)
        lat = (h // cfg.downscale, w // cfg.downscale)
    strength, subseed = p.subseed_strength, p.subseed
    return lambda seeds: ([subseed + i for i in range(len(seeds))] if strength else None, strength, lat)


def _hires_size(p, pipe):
    if p.hires_scale is None:
        return None
    if hires_upscaler_key(p.hires_upscaler) not in HIRES_UPSCALERS:
        pipe.upscalers.find(p.hires_upscaler)  # a model upscaler's name or file, else its one-line error
    if not 0.0 <= p.hires_strength <= 1.0 or p.hires_scale <= 0:
        raise KilnError("hires strength must be in [0, 1] and the hires scale positive")
    unit = size_unit(pipe.cfg)
    w, h = p.width or pipe.native_size, p.height or pipe.native_size
    big = (int(w * p.hires_scale) // unit * unit, int(h * p.hires_scale) // unit * unit)
    check_size(pipe.cfg, *big)
    return big


# ---------------------------------------------------------------------------------------------- recording
def recorded_schedule(spec, schedule: str, model_default: str | None = None) -> str | None:
    """The schedule a generation records. DDIM and PLMS record it only when it or the model's default for them is
    not CompVis' uniform one, so infotexts of real checkpoints stay CompVis'/A1111's and an image made on a model
    whose default is quad (the embedded demo model's PLMS) regenerates with the discretization it was made with."""
    if spec.kind == "denoise" or schedule != "normal" or (model_default or "normal") != "normal":
        return schedule
    return None


def record(p: GenerationParams, c: Checked, pipe, width: int, height: int, masked: bool) -> dict:
    """The parameters a result carries (and kiln's JSON metadata writes): resolved names, sizes and defaults."""
    out = dict(steps=p.steps, sampler=c.spec.name,
               schedule=recorded_schedule(c.spec, c.schedule, model_default(c.spec, pipe.cfg.sampler_schedules)),
               cfg_scale=p.scale, width=width, height=height, negative_prompt=p.negative_prompt, eta=c.eta,
               s_noise=p.s_noise, clip_skip=p.clip_skip, batch_size=p.batch_size, n_iter=p.n_iter,
               fixed_code=p.fixed_code, precision=pipe.precision, ema=pipe.info.ema_used)
    if p.mode == "img2img":
        out.update(strength=p.strength, mask_blur=p.mask_blur if masked else None,
                   inpaint_fill=p.inpaint_fill if masked else None, resize_mode=p.resize_mode,
                   inpaint_area=p.inpaint_area if masked else None)
    out.update(subseed=p.subseed, subseed_strength=p.subseed_strength, seed_resize_from=p.seed_resize_from,
               seamless=p.seamless)
    if p.mode == "txt2img":
        upscaler = hires_upscaler_key(p.hires_upscaler)
        if upscaler not in HIRES_UPSCALERS:  # a model upscaler, as listed ("4x-UltraSharp" for "4x-ultrasharp")
            upscaler = pipe.upscalers.canonical(upscaler)
        out.update(hires_scale=p.hires_scale, hires_upscaler=upscaler, hires_steps=p.hires_steps,
                   hires_strength=p.hires_strength)
    if pipe.refiner is not None:
        out.update(refiner=pipe.refiner.info.path, refiner_switch=pipe.refiner_switch)
    if c.decoder is not None:
        out.update(decoder=c.decoder.name)
    return out


def hires_upscaler_key(name: str) -> str:
    """`hires_upscaler` as the loop reads it: every latent mode (A1111's "Latent (bicubic)", …) is "latent";
    Lanczos and Nearest by their lowercase names; anything else, a model upscaler, as named."""
    key = name.strip().lower()
    return "latent" if key.startswith("latent") else key if key in ("lanczos", "nearest") else name.strip()


def hires_upscaler_name(name: str) -> str:
    """A1111's name for a `hires_upscaler` value: Latent, Lanczos, Nearest, or a model upscaler's own name."""
    return {"latent": "Latent", "lanczos": "Lanczos", "nearest": "Nearest"}.get(name, name)


def _fmt(v: float) -> str:
    return f"{v:g}"


def infotext_fields(p: GenerationParams, recorded: dict, pipe, region: bool, masked: bool) -> dict:
    """A1111's infotext keys for what `recorded` holds beyond the basics (`generation_fields` writes those)."""
    f = {}
    if p.mode == "img2img":
        f["Denoising strength"] = _fmt(p.strength)
        f["Mask blur"] = _fmt(p.mask_blur) if masked else None
        f["Inpaint area"] = "Only masked" if region else None
        f["Masked area padding"] = p.masked_padding if region else None
    if recorded.get("subseed_strength"):
        f["Variation seed"] = recorded["subseed"]
        f["Variation seed strength"] = _fmt(recorded["subseed_strength"])
    if recorded.get("seed_resize_from"):
        f["Seed resize from"] = "{}x{}".format(*recorded["seed_resize_from"])
    if recorded.get("seamless"):
        f["Tiling"] = "True"
    if pipe.deepcache:
        f["DeepCache interval"], f["DeepCache depth"] = pipe.deepcache
    if recorded.get("hires_scale"):
        f["Denoising strength"] = _fmt(recorded["hires_strength"])
        f["Hires upscale"] = _fmt(recorded["hires_scale"])
        f["Hires steps"] = recorded["hires_steps"]
        f["Hires upscaler"] = hires_upscaler_name(recorded["hires_upscaler"])
    if recorded.get("refiner"):
        r = pipe.refiner
        f["Refiner"] = f"{r.model_name} [{r.model_hash[:10]}]" if r.model_hash else r.model_name
        f["Refiner switch at"] = _fmt(recorded["refiner_switch"])
    if recorded.get("decoder"):
        f["VAE Decoder"] = TAESD  # A1111's key and value (its sd_vae_decode_method); the file is in `record`
    return f
