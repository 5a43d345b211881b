"""The only code that reads weights: CompVis single files (.safetensors, .ckpt), diffusers folders, VAE files.

`load_model(path)` returns a ready `LatentDiffusion` (eval mode, no grad) and a `LoadInfo`.
Weights are assigned tensor by tensor into a model built on the meta device, converted straight to the
target dtype and device, so loading never holds a second copy of the model.
"""
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.sd import LatentDiffusion, ModelConfig
from ..models.conv import release_pages
from . import diffusers_keys
from .detect import CLIP, UNET, VAE, clip_config, config_from_yaml, detect, guess_v_prediction, unet_config, vae_config
from .sources import TensorSource, open_file

EMA = "model_ema."
EMA_CHOICES = ("auto", "on", "off")
PREDICTIONS = ("eps", "v")


@dataclass
class LoadInfo:
    path: str
    config: ModelConfig
    ema_used: bool
    vae_path: str | None = None
    notes: list[str] = field(default_factory=list)  # one-line facts worth telling the user once


def ema_key(key: str) -> str:
    """LitEma's name for a UNet weight: `model.` dropped, then every dot removed."""
    return EMA + key[len("model."):].replace(".", "")


def has_ema(src: TensorSource) -> bool:
    return sum(1 for k in src.keys() if k.startswith(EMA) and k not in (EMA + "decay", EMA + "num_updates")) > 100


# ---------------------------------------------------------------- diffusers folders

def _component_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def open_diffusers_folder(root: Path) -> TensorSource:
    """A diffusers folder seen under CompVis names (config from the tensors, checked against ours)."""
    parts = {}
    components = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))
    for sub, stem in components:
        f = _component_file(root / sub, stem)
        if f is None and sub == "text_encoder":
            f = _component_file(root / sub, "pytorch_model")
        if f is None:
            raise CheckpointError(f"{root}: a diffusers folder needs {sub}/{stem}.safetensors (or .bin); not found")
        parts[sub] = open_file(f)

    # The UNet's layout is read from its config.json; we rebuild our key names from it.
    try:
        ucfg = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root}/unet/config.json: unreadable ({e})") from None
    te_src = parts["text_encoder"]
    layers = ucfg.get("layers_per_block", 2)

    # Build our model on meta from the folder's configs, then find each of our tensors under its diffusers name.
    our = {}
    cfg = _diffusers_config(ucfg, te_src, root)
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    te_prefix = "text_model." if any(k.startswith("text_model.") for k in te_src.keys()) else ""
    for key in model.state_dict():
        if key.startswith(UNET):
            our[key] = ("unet", diffusers_keys.unet_key(key[len(UNET):], layers))
        elif key.startswith(VAE):
            our[key] = ("vae", diffusers_keys.vae_key(key[len(VAE):], len(cfg.vae.ch_mult)))
        else:
            our[key] = ("text_encoder", te_prefix + key[len(CLIP):])
    missing = [f"{sub}/{name}" for sub, name in our.values() if name not in parts[sub]]
    if missing:
        raise CheckpointError(f"{root}: not a Stable Diffusion 1.x diffusers folder; missing e.g. {missing[:3]}")

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def get(key):
        sub, name = our[key]
        t = parts[sub].get(name)
        return t.reshape(expected[key]) if t.shape != expected[key] else t  # VAE attention: linear ↔ 1x1 conv

    return TensorSource(expected, get, {"kiln_config": json.dumps(cfg.to_dict())}, str(root))


def _diffusers_config(ucfg, te_src, root) -> ModelConfig:
    if (ucfg.get("cross_attention_dim", 768) != 768 or ucfg.get("use_linear_projection")
            or ucfg.get("addition_embed_type")):
        raise CheckpointError(f"{root}: an SD 2.x/SDXL diffusers folder; only SD 1.x is supported yet")
    from ..models.unet import UNetConfig
    from ..models.vae import VAEConfig

    blocks = ucfg["down_block_types"]
    mc = ucfg["block_out_channels"][0]
    unet = UNetConfig(
        in_channels=ucfg["in_channels"], out_channels=ucfg["out_channels"], model_channels=mc,
        attention_resolutions=tuple(2 ** i for i, b in enumerate(blocks) if "CrossAttn" in b),
        num_res_blocks=ucfg["layers_per_block"], channel_mult=tuple(c // mc for c in ucfg["block_out_channels"]),
        num_heads=ucfg.get("attention_head_dim", 8) if isinstance(ucfg.get("attention_head_dim", 8), int) else 8,
        context_dim=ucfg.get("cross_attention_dim", 768))
    vcfg = json.loads((root / "vae" / "config.json").read_text()) if (root / "vae" / "config.json").is_file() else {}
    ch = vcfg.get("block_out_channels", [128, 256, 512, 512])
    vae = VAEConfig(in_channels=vcfg.get("in_channels", 3), out_ch=vcfg.get("out_channels", 3), ch=ch[0],
                    ch_mult=tuple(c // ch[0] for c in ch), num_res_blocks=vcfg.get("layers_per_block", 2),
                    z_channels=vcfg.get("latent_channels", 4), embed_dim=vcfg.get("latent_channels", 4))
    te_prefix = "text_model." if any(k.startswith("text_model.") for k in te_src.keys()) else ""
    text = clip_config(te_src, te_prefix)
    family = {4: "sd1", 9: "sd1-inpaint"}.get(unet.in_channels, "sd1")
    return ModelConfig(family=family, unet=unet, vae=vae, text=text, scale_factor=vcfg.get("scaling_factor", 0.18215))


# ---------------------------------------------------------------- separate VAE files

def open_vae(path) -> TensorSource:
    """A VAE file in CompVis naming, with or without the `first_stage_model.` prefix."""
    src = open_file(path)
    if any(k.startswith(VAE + "encoder.") for k in src.keys()):
        mapping = {k: k for k in src.keys() if k.startswith(VAE)}
    elif "encoder.conv_in.weight" in src:
        prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        mapping = {VAE + k: k for k in src.keys() if k.startswith(prefixes)}
    else:
        raise CheckpointError(f"{path}: not a VAE file (no 'encoder.conv_in.weight' or 'first_stage_model.encoder.*')")
    return src.renamed(mapping, str(path))


# ---------------------------------------------------------------- the loader

def open_source(path) -> TensorSource:
    path = Path(path)
    if path.is_dir():
        return open_diffusers_folder(path)
    return open_file(path)


def sidecar_yaml(path) -> Path | None:
    """`model.yaml` beside `model.safetensors` (the convention of CompVis' and A1111's model folders)."""
    path = Path(path)
    if path.is_dir():
        return None
    side = path.with_suffix(".yaml")
    return side if side.is_file() else None


def converted(raw: torch.Tensor, device, dtype) -> torch.Tensor:
    """`raw` on `device` in `dtype`. A converted copy hands back the pages `raw` was read from: a memory-mapped
    file's pages would otherwise stay resident beside the copy (SD 1.5 fp32 computed in bf16: +4.3 GB of RSS)."""
    t = raw.to(device=device, dtype=dtype)
    if t.data_ptr() != raw.data_ptr():
        release_pages(raw)
    return t


def load_model(path, *, ema: str = "auto", vae: str | None = None, config_yaml: str | None = None,
               prediction: str | None = None, dtype: torch.dtype = torch.float32,
               device="cpu", channels_last: bool = False) -> tuple[LatentDiffusion, LoadInfo]:
    """`prediction` ("eps" | "v") overrides the model's parameterization; otherwise it comes from the yaml
    (`config_yaml`, or one beside the file), or, for SD 2.x files, from `guess_v_prediction`. `channels_last`
    stores the UNet's and VAE's convolution weights NHWC, converted tensor by tensor (no second copy)."""
    if ema not in EMA_CHOICES:
        raise CheckpointError(f"--ema must be one of {', '.join(EMA_CHOICES)}, not {ema!r}")
    if prediction not in (None, *PREDICTIONS):
        raise CheckpointError(f"--prediction must be one of {', '.join(PREDICTIONS)}, not {prediction!r}")
    src = open_source(path)
    cfg = detect(src)
    notes = []
    if config_yaml is None and "kiln_config" not in src.metadata:
        config_yaml = sidecar_yaml(path)
        if config_yaml is not None:
            notes.append(f"model config from {config_yaml.name} beside the weights")
    if config_yaml:
        cfg = replace(cfg, **config_from_yaml(config_yaml))
    if "global_step" in src.metadata:
        notes.append(f"global step {src.metadata['global_step']}")

    use_ema = has_ema(src) and ema != "off"
    if ema == "on" and not has_ema(src):
        raise CheckpointError(f"{path}: --ema on, but the file holds no EMA weights (no 'model_ema.*' tensors)")
    if use_ema:
        notes.append("using the EMA weights stored in the file (model_ema.*); pass --ema off for the raw weights")

    vae_src = open_vae(vae) if vae else None
    if vae_src is not None:
        vcfg = vae_config(vae_src)
        if vcfg != cfg.vae:
            raise CheckpointError(f"{vae}: this VAE does not fit the model (its layout {vcfg} differs from {cfg.vae})")

    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    expected = model.state_dict()

    def pick(key):
        if vae_src is not None and key.startswith(VAE):
            return vae_src, key
        if use_ema and key.startswith(UNET):
            return src, ema_key(key)
        return src, key

    missing, wrong = [], []
    for key, want in expected.items():
        s, k = pick(key)
        if k not in s:
            missing.append(k)
        elif s.shape(k) != tuple(want.shape):
            wrong.append(f"{k}: file {list(s.shape(k))}, model {list(want.shape)}")
    if missing or wrong:
        detail = (f"{len(missing)} tensors missing, e.g. {missing[:3]}" if missing else "") + \
                 ("; " if missing and wrong else "") + \
                 (f"{len(wrong)} of the wrong shape, e.g. {wrong[:2]}" if wrong else "")
        raise CheckpointError(f"{path}: does not match the detected {cfg.family} architecture: {detail}")

    state = {}
    nhwc = lambda key, t: channels_last and t.dim() == 4 and key.startswith((UNET, VAE))
    for key in expected:
        s, k = pick(key)
        t = converted(s.get(k), device, dtype)
        state[key] = t.contiguous(memory_format=torch.channels_last) if nhwc(key, t) else t
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # cannot happen after the checks above, but never leave a half-built model
        raise CheckpointError(f"{path}: {e}") from None
    del state
    model.requires_grad_(False).eval()
    if prediction is None and cfg.family == "sd2" and not config_yaml:
        prediction = "v" if guess_v_prediction(model.unet) else "eps"
        notes.append(f"{'v' if prediction == 'v' else 'ε'}-prediction model (guessed from the weights; "
                     f"--prediction eps|v overrides)")
    if prediction is not None and prediction != cfg.parameterization:
        native = (768 if prediction == "v" else 512) if cfg.family == "sd2" else cfg.native_size
        cfg = replace(cfg, parameterization=prediction, native_size=native)
        model.cfg = cfg
    return model, LoadInfo(str(path), cfg, use_ema, str(vae) if vae else None, notes)


def load_ema_weights(path, dtype: torch.dtype = torch.float32, device="cpu") -> dict | None:
    """The file's EMA UNet weights (`model_ema.*`) under the UNet's own names, or None when it has none."""
    src = open_source(path)
    if not has_ema(src):
        return None
    with torch.device("meta"):
        model = LatentDiffusion(detect(src))
    out = {}
    for key in model.state_dict():
        if key.startswith(UNET):
            k = ema_key(key)
            if k not in src:
                raise CheckpointError(f"{path}: EMA weights incomplete (no {k})")
            out[key] = src.get(k).to(device=device, dtype=dtype)
    return out


__all__ = ["load_model", "load_ema_weights", "LoadInfo", "open_source", "open_file", "open_vae", "detect",
           "unet_config", "vae_config", "clip_config", "config_from_yaml", "ema_key", "has_ema", "sidecar_yaml",
           "EMA_CHOICES", "PREDICTIONS"]
