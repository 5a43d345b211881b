"""Test helpers: random full-size SD 1.5 weights in the CompVis layout, and independent references built from
them with diffusers' own single-file converters and transformers' CLIP (test-only dependencies).

Every tensor is random (norm affines too: a swapped norm1/norm2 must show), scaled by 1/sqrt(fan_in) so
activations stay in range; the UNet output and VAE output convolutions are then calibrated so that ε has
unit standard deviation and decoded pixels ≈ 0.5, so parity is about real signal, not about zeros.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
import yaml

from kiln.models import LatentDiffusion, ModelConfig

DATA = Path(__file__).parent / "data"
ASSETS = Path(__file__).parent.parent / "kiln" / "assets"


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if len(shape) == 1:
        is_norm = any(s in name for s in ("norm", "in_layers.0", "out_layers.0", "out.0."))
        if name.endswith(".weight") and is_norm:
            return x.mul_(0.1).add_(1.0)
        return x.mul_(0.05)  # biases
    if "token_embedding" in name or "position_embedding" in name:
        return x.mul_(0.5)
    return x.mul_(x[0].numel() ** -0.5)  # 1/sqrt(fan_in)


def random_state(cfg: ModelConfig = ModelConfig(), seed: int = 0, prefix_filter=None) -> dict:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen) for k, s in shapes.items() if prefix_filter is None or k.startswith(prefix_filter)}


def model_from_state(state: dict, cfg: ModelConfig = ModelConfig()) -> LatentDiffusion:
    """Our model sharing the tensors of `state` (no copy)."""
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def calibrate(state: dict, cfg: ModelConfig = ModelConfig()):
    """Scale the output convolutions in place: ε std 1 at t=500 on N(0,1) latents; decoded pixels std 0.5."""
    model = model_from_state(state, cfg)
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = model.text_model(torch.randint(0, 49407, (2, 77), generator=gen))
    x_in = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=gen) if cfg.unet.in_channels != 4 else x
    eps = model.unet(x_in, torch.tensor([500, 500]), ctx)
    for k in ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"):
        state[k].mul_(1.0 / eps.std())
    img = model.vae.decode(x)
    for k in ("first_stage_model.decoder.conv_out.weight", "first_stage_model.decoder.conv_out.bias"):
        state[k].mul_(0.5 / img.std())
    mean, _ = model.vae.encode(torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1)
    for k in ("first_stage_model.encoder.conv_out.weight", "first_stage_model.encoder.conv_out.bias"):
        state[k].mul_(1.0 / mean.std())


def schedule_buffers(cfg: ModelConfig = ModelConfig()) -> dict:
    """A few of the DDPM buffers real files carry (extra keys the loader must tolerate)."""
    from kiln.models import alphas_cumprod

    ac = alphas_cumprod(cfg)
    return {"alphas_cumprod": ac, "sqrt_alphas_cumprod": ac.sqrt(),
            "betas": 1 - ac / torch.cat([torch.ones(1), ac[:-1]])}


def ema_name(key: str) -> str:
    return "model_ema." + "".join(key.split(".")[1:])


# ------------------------------------------------------------------ references (diffusers / transformers)

def original_config() -> dict:
    return yaml.safe_load((DATA / "v1-inference.yaml").read_text())


def hf_clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _assign(module, state):
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return module.eval().requires_grad_(False)


def ref_clip(checkpoint: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(hf_clip_config())
    sd = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    model = _assign(model, sd)
    emb = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    if hasattr(emb, "position_ids"):  # a non-persistent buffer left on meta
        emb.position_ids = torch.arange(77)[None]
    return model


def ref_unet(checkpoint: dict, extract_ema=False, in_channels=4):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = original_config()
    original["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    cfg = create_unet_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return _assign(unet, convert_ldm_unet_checkpoint(checkpoint, cfg, extract_ema=extract_ema))


def ref_vae(checkpoint: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    cfg = create_vae_diffusers_config_from_ldm(original_config(), checkpoint)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    return _assign(vae, convert_ldm_vae_checkpoint(checkpoint, cfg))


def hf_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, made from the BPE merges we ship."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(ASSETS / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def hf_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    hf_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>",
                                         unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                                         eos_token="<|endoftext|>")


def ref_pipeline(checkpoint: dict, tok_dir: Path, extract_ema=False):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=ref_vae(checkpoint), text_encoder=ref_clip(checkpoint),
                                   tokenizer=hf_tokenizer(tok_dir), unet=ref_unet(checkpoint, extract_ema),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ------------------------------------------------------------------ a tiny model of the same architecture

def tiny_config():
    from kiln.models import CLIPTextConfig, UNetConfig, VAEConfig

    return ModelConfig(
        family="sd1",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                        num_heads=2, context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
        text=CLIPTextConfig(width=64, layers=2, heads=2, mlp_width=128),
        native_size=64)


def save_tiny(path: Path, seed: int = 0, dtype=torch.float32, metadata=True) -> dict:
    """A random tiny CompVis-layout .safetensors (its kiln config in the header metadata); returns the state."""
    from safetensors.torch import save_file

    cfg = tiny_config()
    state = random_state(cfg, seed=seed)
    calibrate(state, cfg)
    meta = {"kiln_config": json.dumps(cfg.to_dict())} if metadata else None
    save_file({k: v.to(dtype) for k, v in state.items()}, path, metadata=meta)
    return state
