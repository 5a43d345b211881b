"""An SDXL ControlNet in the pipelines at a tiny size: SDXL's architecture (two text encoders, the pooled text and
time ids as the vector `c.vector`, a level without attention, linear projections) with tiny widths, random
weights, and a random ControlNet in diffusers' folder layout, run by kiln and by diffusers'
StableDiffusionXLControlNetPipeline built from the same tensors with diffusers' own converters. Seconds, so every CI
run checks the SDXL path; the full-size check is tests/test_parity_sdxl.py (minutes, 19 GB)."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import sdref
from kiln.models import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from kiln.pipeline import generators, load, randn
from kiln.pipeline.control import ControlUnit

PROMPT, SIZE, STEPS = "a red cube on a blue table", 128, 5
CASES = {"weight 1": (1.0, 1.0), "weight 0.6, end 0.5": (0.6, 0.5)}  # (weight, guidance end)
POOLED = 32
TINY_XL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(model_channels=32, attention_resolutions=(2,), channel_mult=(1, 2), num_heads=-1,
                    num_head_channels=16, transformer_depth=(1, 2), context_dim=128, use_linear_in_transformer=True,
                    adm_in_channels=POOLED + 6 * 256),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),  # 8x down, as SDXL's: the hint block's factor
    text=CLIPTextConfig(width=64, layers=2, heads=2, mlp_width=128),
    text2=CLIPTextConfig(kind="openclip", width=64, layers=2, heads=2, mlp_width=128, act="gelu", projection=POOLED),
    text_skip=1, text_final_norm=False, scale_factor=0.13025, native_size=SIZE, watermark="SDXL")
# diffusers' ControlNetModel config of the same layout (attention_head_dim: diffusers' name for the head counts)
CONTROLNET = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [2, 4],
              "block_out_channels": [32, 64], "cross_attention_dim": 128,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
              "projection_class_embeddings_input_dim": POOLED + 6 * 256, "transformer_layers_per_block": [1, 2],
              "use_linear_projection": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-xl")
    state = sdref.random_state(TINY_XL, seed=3)
    sdref.calibrate(state, TINY_XL)
    save_file({**state, **sdref.schedule_buffers(TINY_XL)}, str(root / "tiny-xl.safetensors"),
              metadata={"kiln_config": json.dumps(TINY_XL.to_dict())})
    control = sdref.random_controlnet(TINY_XL.unet, state.get, seed=4)
    # a dotted folder name, as controlnet-canny-sdxl-1.0's
    folder = sdref.save_diffusers_controlnet(root / "controlnet-tiny-xl-1.0", control, CONTROLNET)
    return {"ckpt": root / "tiny-xl.safetensors", "controlnet": folder, "state": state,
            "tokenizer": sdref.hf_tokenizer_files(root / "tokenizer")}


def edge_map():
    image = Image.new("RGB", (SIZE, SIZE), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 12, 42, 50], outline="white", width=2)
    draw.ellipse([28, 20, 60, 52], outline="white", width=2)
    return image


def ref_text_encoders(state):
    """transformers' CLIP-L and bigG shapes at the tiny widths, converted by diffusers' own converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    with torch.device("meta"):
        first = CLIPTextModel(HFConfig(hidden_act="quick_gelu", pad_token_id=1, **kw))
        second = CLIPTextModelWithProjection(HFConfig(hidden_act="gelu", projection_dim=POOLED, pad_token_id=0, **kw))
    converted = convert_ldm_clip_checkpoint(state)
    first = sdref._assign_text_model(first, {k: v for k, v in converted.items() if not k.endswith("position_ids")})
    second = sdref._assign_text_model(second, convert_open_clip_checkpoint(
        second, state, prefix="conditioner.embedders.1.model."))
    return first, second


def ref_pipeline(files):
    """diffusers' StableDiffusionXLControlNetPipeline: sd_xl_base.yaml at the tiny sizes through diffusers' config
    helpers (which take a vector-conditioned UNet of another context width for a class-conditioned one, hence the
    SDXL embedding named here), the ControlNet folder as diffusers loads it."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionXLControlNetPipeline, \
        UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, \
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm
    from transformers import CLIPTokenizer

    state = files["state"]
    original = yaml.safe_load((sdref.DATA / "sd_xl_base.yaml").read_text())
    u = TINY_XL.unet
    original["model"]["params"]["network_config"]["params"].update(
        adm_in_channels=u.adm_in_channels, model_channels=u.model_channels, attention_resolutions=[2],
        channel_mult=list(u.channel_mult), num_head_channels=u.num_head_channels,
        transformer_depth=list(u.transformer_depth), context_dim=u.context_dim)
    original["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(
        ch=TINY_XL.vae.ch, ch_mult=list(TINY_XL.vae.ch_mult), num_res_blocks=TINY_XL.vae.num_res_blocks)
    ucfg = create_unet_diffusers_config_from_ldm(original, state)
    ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    vcfg = create_vae_diffusers_config_from_ldm(original, state)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    first, second = ref_text_encoders(state)
    tok_kw = dict(model_max_length=77, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                  eos_token="<|endoftext|>")
    return StableDiffusionXLControlNetPipeline(
        vae=sdref._assign(vae, convert_ldm_vae_checkpoint(state, vcfg)), text_encoder=first, text_encoder_2=second,
        tokenizer=CLIPTokenizer.from_pretrained(str(files["tokenizer"]), pad_token="<|endoftext|>", **tok_kw),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(files["tokenizer"]), pad_token="!", **tok_kw),
        unet=sdref._assign(unet, convert_ldm_unet_checkpoint(state, ucfg)),
        controlnet=ControlNetModel.from_pretrained(str(files["controlnet"]), torch_dtype=torch.float32).eval(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=False, add_watermarker=False)


@pytest.fixture(scope="module")
def runs(files):
    pipe = load(files["ckpt"], device="cpu", precision="full")
    assert pipe.cfg == TINY_XL
    kw = dict(steps=STEPS, sampler="ddim", cfg_scale=7.5, width=SIZE, height=SIZE, seed=42)
    ours = {"none": pipe.txt2img(PROMPT, **kw).pixels}
    for name, (weight, end) in CASES.items():
        result = pipe.txt2img(PROMPT, controlnets=[ControlUnit(files["controlnet"], edge_map(), weight, 0.0, end)],
                              **kw)
        ours[name], ours[name + " infotext"] = result.pixels, result.infotexts[0]
    ref = ref_pipeline(files)
    theirs = {}
    for name, (weight, end) in CASES.items():
        latents = randn((4, SIZE // 8, SIZE // 8), generators([42]), "cpu")
        with torch.no_grad():
            theirs[name] = ref(prompt=PROMPT, negative_prompt="", image=edge_map(), height=SIZE, width=SIZE,
                               controlnet_conditioning_scale=weight, control_guidance_start=0.0,
                               control_guidance_end=end, num_inference_steps=STEPS, guidance_scale=7.5, eta=0.0,
                               latents=latents, output_type="np").images
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_sdxl_controlnet_matches_diffusers(runs, case):
    from test_parity_e2e import assert_pixels_match

    ours, theirs = runs
    assert ours[case].shape == (1, SIZE, SIZE, 3)
    assert_pixels_match(ours[case], theirs[case])
    moved = (np.abs(ours[case].astype(int) - ours["none"].astype(int)).max(axis=-1) > 2).mean()
    close = (np.abs(ours[case] / 255.0 - theirs[case]) <= 1 / 255 + 1e-6).mean()
    print(f"{case}: {close:.4%} of values within 1/255; the control moved {moved:.1%} of the pixels")
    assert moved > 0.5, f"the control moved only {moved:.1%} of the pixels"
    # a diffusers folder is named by its folder (dots kept) and hashed by its weights file
    assert 'Model: controlnet-tiny-xl-1.0 [' in ours[case + " infotext"]
