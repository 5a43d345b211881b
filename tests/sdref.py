"""Test helpers: random full-size SD 1.5 weights in the CompVis layout, and independent references built from
them with diffusers' own single-file converters and transformers' CLIP (test-only dependencies).

Every tensor is random (norm affines too: a swapped norm1/norm2 must show), scaled by 1/sqrt(fan_in) so
activations stay in range; the UNet output and VAE output convolutions are then calibrated so that ε has
unit standard deviation and decoded pixels ≈ 0.5, so parity is about real signal, not about zeros.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from kiln.models import LatentDiffusion, ModelConfig

DATA = Path(__file__).parent / "data"
ASSETS = Path(__file__).parent.parent / "kiln" / "assets"


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if len(shape) == 0:  # open_clip's logit_scale
        return torch.tensor(4.6052)
    if len(shape) == 1:
        is_norm = any(s in name for s in ("norm", "in_layers.0", "out_layers.0", "out.0.", ".ln_"))
        if name.endswith(".weight") and is_norm:
            return x.mul_(0.1).add_(1.0)
        return x.mul_(0.05)  # biases
    if any(s in name for s in ("token_embedding", "position_embedding", "positional_embedding")):
        return x.mul_(0.5)
    return x.mul_(x[0].numel() ** -0.5)  # 1/sqrt(fan_in)


def random_state(cfg: ModelConfig = ModelConfig(), seed: int = 0, prefix_filter=None) -> dict:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen) for k, s in shapes.items()
            if prefix_filter is None or k.startswith(prefix_filter)}


def model_from_state(state: dict, cfg: ModelConfig = ModelConfig()) -> LatentDiffusion:
    """Our model sharing the tensors of `state` (no copy)."""
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    keys = model.state_dict().keys()  # once: state_dict() walks every module (quadratic inside the comprehension)
    model.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def calibrate(state: dict, cfg: ModelConfig = ModelConfig()):
    """Scale the output convolutions in place: ε std 1 at t=500 on N(0,1) latents; decoded pixels std 0.5."""
    model = model_from_state(state, cfg)
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    if cfg.is_sdxl:
        ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=gen)
    else:
        ctx = model.text_model(torch.randint(0, 49407, (2, 77), generator=gen))
    y = torch.randn(2, cfg.unet.adm_in_channels, generator=gen) if cfg.unet.adm_in_channels else None
    x_in = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=gen) if cfg.unet.in_channels != 4 else x
    eps = model.unet(x_in, torch.tensor([500, 500]), ctx, y)
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


def load_float(path) -> dict:
    """Every tensor of a safetensors file in fp32, read one at a time: the peak is the fp32 state alone, not the
    whole fp16 file beside it (SDXL: 13.8 GB instead of 20.7)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}


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


def _assign_text_model(model, sd):
    """A transformers CLIP text model on meta filled with `sd` (names with or without `text_model.`)."""
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model = _assign(model, sd)
    emb = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    if hasattr(emb, "position_ids"):  # a non-persistent buffer left on meta
        emb.position_ids = torch.arange(77)[None]
    return model


def ref_clip(checkpoint: dict):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(hf_clip_config())
    sd = convert_ldm_clip_checkpoint(checkpoint)
    return _assign_text_model(model, {k: v for k, v in sd.items() if not k.endswith("position_ids")})


def ref_unet(checkpoint: dict, extract_ema=False, in_channels=4, yaml_name=None):
    """diffusers' UNet from the CompVis checkpoint, configured by `yaml_name` in tests/data (default: SD v1's
    config with `in_channels`)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    if yaml_name:
        original = yaml.safe_load((DATA / yaml_name).read_text())
    else:
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
    from kiln.bench import hf_tokenizer_files as write

    return write(folder)


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


# ------------------------------------------------------------------ SD 2.x

def sd2_config(prediction="v"):
    """SD 2.x as the upstream v2-inference(-v).yaml and open_clip's ViT-H/14 text tower define it."""
    from kiln.models import CLIPTextConfig, UNetConfig

    return ModelConfig(
        family="sd2", unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024,
                                      use_linear_in_transformer=True, upcast_attention=True),
        text=CLIPTextConfig(kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096, act="gelu",
                            projection=1024),
        text_skip=1, parameterization=prediction, native_size=768 if prediction == "v" else 512, watermark="SDV2")


def ref_openclip(checkpoint: dict):
    """transformers' CLIPTextModel as diffusers' SD 2 uses it: 23 layers (the penultimate, then the final norm),
    converted from open_clip's names by diffusers' own `convert_open_clip_checkpoint`."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    sd = convert_open_clip_checkpoint(model, checkpoint)
    return _assign_text_model(model, {k: v for k, v in sd.items() if not k.startswith("text_projection")})


def ref_sd2_pipeline(checkpoint: dict, tok_dir: Path, prediction="v"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = ref_unet(checkpoint, yaml_name="v2-inference-v.yaml" if prediction == "v" else "v2-inference.yaml")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if prediction == "v" else "epsilon")
    from transformers import CLIPTokenizer

    hf_tokenizer_files(tok_dir)  # SD 2's tokenizer pads with "!" (id 0), as open_clip does
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77, pad_token="!", unk_token="<|endoftext|>",
                                        bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    return StableDiffusionPipeline(vae=ref_vae(checkpoint), text_encoder=ref_openclip(checkpoint), tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ------------------------------------------------------------------ SDXL

def sdxl_config():
    from kiln.models import CLIPTextConfig, UNetConfig

    return ModelConfig(
        family="sdxl",
        unet=UNetConfig(model_channels=320, attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_heads=-1,
                        num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048,
                        use_linear_in_transformer=True, adm_in_channels=2816),
        text=CLIPTextConfig(),
        text2=CLIPTextConfig(kind="openclip", width=1280, layers=32, heads=20, mlp_width=5120, act="gelu",
                             projection=1280),
        text_skip=1, text_final_norm=False, scale_factor=0.13025, native_size=1024, watermark="SDXL")


def ref_big_g(checkpoint: dict):
    """transformers' CLIPTextModelWithProjection converted by diffusers' `convert_open_clip_checkpoint`."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
    return _assign_text_model(model, converted)


def ref_sdxl_pipeline(checkpoint: dict, tok_dir: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from transformers import CLIPTokenizer

    original = yaml.safe_load((DATA / "sd_xl_base.yaml").read_text())
    vcfg = create_vae_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        vae = AutoencoderKL(**vcfg)
    vae = _assign(vae, convert_ldm_vae_checkpoint(checkpoint, vcfg))
    hf_tokenizer_files(tok_dir)
    tok_kw = dict(model_max_length=77, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                  eos_token="<|endoftext|>")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=ref_clip(checkpoint), text_encoder_2=ref_big_g(checkpoint),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="<|endoftext|>", **tok_kw),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!", **tok_kw),
        unet=ref_unet(checkpoint, yaml_name="sd_xl_base.yaml"), scheduler=sched, force_zeros_for_empty_prompt=False,
        add_watermarker=False)


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


# ------------------------------------------------------------------ random kohya LoRAs over full-size layouts

UNET_LORA_SUFFIXES = ("attn1.to_q.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "ff.net.2.weight",
                      "proj_in.weight")
TE_LORA = {"clip": ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "self_attn.out_proj.weight",
                    "mlp.fc1.weight"),
           "openclip": ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight")}


def kohya_modules(shapes: dict, cfg: ModelConfig) -> dict:
    """{kohya module name: (out, in)} for a selection of our weights, named as kohya's sd-scripts name them:
    SD 1.x UNet in diffusers' names, SDXL UNet in the sgm names, text encoders in Hugging Face's names
    (`lora_te_` for SD 1.x, `lora_te1_`/`lora_te2_` for SDXL's CLIP-L and bigG; bigG's fused q/k/v split in three)."""
    from kiln.checkpoints.diffusers_keys import unet_key

    unet_pre = "model.diffusion_model."
    out = {}
    for key, shape in shapes.items():
        if key.startswith(unet_pre) and key.endswith(UNET_LORA_SUFFIXES) and len(shape) == 2:
            ours = key[len(unet_pre):]
            name = ours if cfg.is_sdxl else unet_key(ours, cfg.unet.num_res_blocks)
            out["lora_unet_" + name[:-len(".weight")].replace(".", "_")] = tuple(shape)
    encoders = ([("conditioner.embedders.0.transformer.text_model.", "clip", "lora_te1_"),
                 ("conditioner.embedders.1.model.", "openclip", "lora_te2_")] if cfg.is_sdxl else
                [("cond_stage_model.transformer.text_model.", "clip", "lora_te_")])
    for pre, kind, tag in encoders:
        for key, shape in shapes.items():
            if not key.startswith(pre) or not key.endswith(TE_LORA[kind]):
                continue
            rest = key[len(pre):]
            if kind == "clip":
                out[tag + "text_model_" + rest[:-len(".weight")].replace(".", "_")] = tuple(shape)
                continue
            i = rest.split(".")[2]  # transformer.resblocks.{i}.…
            hf = f"{tag}text_model_encoder_layers_{i}_"
            if rest.endswith("in_proj_weight"):
                w = shape[1]
                for q in "qkv":
                    out[f"{hf}self_attn_{q}_proj"] = (w, w)
            else:
                out[hf + {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1"}[
                    rest.split(".", 3)[3]]] = tuple(shape)
    return out


def random_kohya_lora(modules: dict, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """Low-rank pairs whose product changes each weight by about 15% of its scale (alpha/rank = 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in sorted(modules.items()):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=gen) * i ** -0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=gen) * 0.15
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


# ------------------------------------------------------------------ ControlNets

TRAINED_CONTROL = ("input_hint_block", "zero_convs", "middle_block_out")  # random in the test ControlNets


def random_controlnet(unet_cfg, unet_tensor, seed: int, dtype=torch.float32) -> dict:
    """A ControlNet in lllyasviel's names (no prefix) as training starts one, its encoder a copy of the UNet's
    (`unet_tensor(name)`: the UNet's tensor named `model.diffusion_model.`+name, None if it has none), then made
    random where training moves it: the hint encoder and the zero convolutions (far from zero: the control moves
    the picture). Built one tensor at a time, each in `dtype`."""
    from kiln.models.controlnet import ControlNetConfig, ControlNetModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ControlNetModel(ControlNetConfig(unet_cfg)).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        copied = None if k.startswith(TRAINED_CONTROL) else unet_tensor("model.diffusion_model." + k)
        state[k] = (copied if copied is not None else random_tensor(k, shape, gen)).to(dtype)
    return state


def save_diffusers_controlnet(folder: Path, state: dict, config: dict) -> Path:
    """The lllyasviel-named `state` as diffusers' ControlNetModel folder (config.json and
    diffusion_pytorch_model.safetensors), renamed by diffusers' own `convert_controlnet_checkpoint`; that converter
    leaves SDXL's vector embedding out, and diffusers' own table names it."""
    from diffusers import ControlNetModel as RefControlNet
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
    from safetensors.torch import save_file

    converted = convert_controlnet_checkpoint(state, config)
    if config.get("addition_embed_type") == "text_time":
        for theirs, ldm in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            converted[theirs] = state[ldm]
    with torch.device("meta"):
        expected = {k: v.shape for k, v in RefControlNet(**config).state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected
    folder.mkdir(parents=True)
    save_file(converted, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}, indent=2))
    return folder
