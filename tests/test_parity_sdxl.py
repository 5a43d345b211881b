"""SDXL base on random full-size weights against diffusers' StableDiffusionXLPipeline built with diffusers' own
converters (`convert_ldm_unet_checkpoint` with sd_xl_base.yaml, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) and transformers' CLIP models; a random kohya LoRA (UNet in the sgm names, both text
encoders) applied by kiln against diffusers' `load_lora_weights`; a random full-size SDXL ControlNet in diffusers'
layout against `StableDiffusionXLControlNetPipeline`. SDXL is 13.8 GB in fp32 (its ControlNet 5 GB more): kiln runs
first and keeps only its outputs, then the reference is built (peak memory is one model, not two)."""
import gc
import os
import shutil
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdref
import taesdref
from kiln.pipeline import generators, load, randn, start_noise
from kiln.pipeline.control import ControlUnit
from test_parity_e2e import STEPS, assert_pixels_match

pytestmark = pytest.mark.slow
PROMPT, OTHER, SIZE = "a red cube on a blue table", "a green cube on a blue table", 64
CONTROL_SIZE = 128
# The full-size SDXL ControlNet case: 5 GB more beside the 13.8 GB model (the module peaked at 23.07 GB resident,
# over CI's 20 GB, and took 9 minutes more), so it runs only when asked (docs/controlnet.md, "SDXL").
FULL_CONTROLNET = os.environ.get("KILN_SDXL_CONTROLNET") == "1"
CONTROL_CASES = {"weight 1": (1.0, 1.0), "weight 0.6, end 0.5": (0.6, 0.5)}  # (weight, guidance end)
# config.json of diffusers/controlnet-canny-sdxl-1.0, the full-size SDXL ControlNet (1.25 B parameters)
XL_CONTROLNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "class_embed_type": None, "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True}
TAESD_SIZE = 128


def probe_inputs():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 77, 2048, generator=gen)
    pooled = torch.randn(2, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [512.0, 512.0, 16.0, 32.0, 640.0, 640.0]])
    return x, torch.tensor([999, 261]), ctx, pooled, time_ids


@pytest.fixture(scope="module")
def xl_lora(sdxl, tmp_path_factory):
    from kiln.models import LatentDiffusion

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(sdxl["config"]).state_dict().items()}
    path = tmp_path_factory.mktemp("lora") / "xl-lora.safetensors"
    save_file(sdref.random_kohya_lora(sdref.kohya_modules(shapes, sdxl["config"])), str(path))
    return path


def first_seed_noise(shape, seeds, *args, **kw):
    """Every image of the batch starts from the first seed's noise, so PROMPT and OTHER render in one call: on a CPU
    that costs far less than two (SDXL's 10 GB of UNet weights are read once per step either way; 128 px: 44 s
    against 2 × 31 s). `start_noise` here is the real one, bound at import, which the patch below does not touch."""
    return start_noise(shape, seeds[:1] * len(seeds), *args, **kw)


def fingerprints(params: dict, keys) -> dict:
    """CRC-32 of each tensor's bytes: detects any change to the LoRA-patched weights without holding a copy of them
    (4.8 GB in fp32: the module's peak resident memory fell from 23.9 to 18.9 GB without that copy)."""
    return {k: zlib.crc32(params[k].detach().contiguous().numpy().view(np.uint8)) for k in keys}


def our_probes(pipe):
    from kiln.models.unet import timestep_embedding

    with torch.no_grad():
        context, pooled = pipe.encode_prompts_pooled([PROMPT, ""])
        x, t, ctx, pool, time_ids = probe_inputs()
        y = torch.cat([pool, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=1)
        return context, pooled, pipe.model.unet(x, t, ctx, y)


def ref_probes(pipe):
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True,
                                                              negative_prompt="")
        x, t, ctx_in, pool, time_ids = probe_inputs()
        eps = pipe.unet(x, t, encoder_hidden_states=ctx_in,
                        added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids}).sample
    return torch.cat([ctx, neg_ctx]), torch.cat([pooled, neg_pooled]), eps


@pytest.fixture(scope="module")
def xl_taesd(tmp_path_factory):
    """Random TAESDXL weights: (the published-layout tensors, the files)."""
    import taesdref

    decoder = taesdref.random_part("decoder", seed=6)
    return decoder, taesdref.write_layouts(tmp_path_factory.mktemp("taesdxl"), decoder, stem="taesdxl")


@pytest.fixture(scope="module")
def xl_controlnet(sdxl, tmp_path_factory):
    """A random full-size SDXL ControlNet as diffusers/controlnet-canny-sdxl-1.0 ships it: a folder with config.json
    and diffusion_pytorch_model.safetensors; its encoder copied from the UNet, the hint encoder and the zero
    convolutions random, renamed by diffusers' own converter (sdref). Built one tensor at a time in fp16, the values
    of the repository's fp16 variant (2.5 GB; never the 5 GB of fp32 at once). None unless asked for."""
    if not FULL_CONTROLNET:
        yield None
        return
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("xl-controlnet")
    with safe_open(str(sdxl["fp16"]), framework="pt") as f:
        names = set(f.keys())
        state = sdref.random_controlnet(sdxl["config"].unet, lambda k: f.get_tensor(k) if k in names else None,
                                        seed=4, dtype=torch.float16)
    folder = sdref.save_diffusers_controlnet(root / "controlnet-canny-sdxl-random", state, XL_CONTROLNET)
    del state
    gc.collect()
    yield folder
    shutil.rmtree(root, ignore_errors=True)  # 2.5 GB


def edge_map():
    """A canny-like control image: white outlines on black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CONTROL_SIZE, CONTROL_SIZE), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 24, 84, 100], outline="white", width=2)
    draw.ellipse([56, 40, 120, 104], outline="white", width=2)
    return image


def our_control_runs(pipe, folder) -> dict:
    """kiln's pictures at 128 px with no unit and with each case's unit."""
    kw = dict(steps=STEPS, sampler="ddim", cfg_scale=7.5, width=CONTROL_SIZE, height=CONTROL_SIZE, seed=42)
    out = {"none": pipe.txt2img(PROMPT, **kw).pixels}
    for name, (weight, end) in CONTROL_CASES.items():
        out[name] = pipe.txt2img(PROMPT, controlnets=[ControlUnit(folder, edge_map(), weight, 0.0, end)], **kw).pixels
    return out


def ref_control_runs(base, folder) -> dict:
    """diffusers' StableDiffusionXLControlNetPipeline: the base pipeline's parts and the ControlNet folder as
    diffusers loads it (`from_pretrained`), in fp32."""
    from diffusers import ControlNetModel as RefControlNet
    from diffusers import StableDiffusionXLControlNetPipeline

    net = RefControlNet.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    assert net.dtype == torch.float32
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=net, force_zeros_for_empty_prompt=False,
                                               add_watermarker=False)
    out = {}
    for name, (weight, end) in CONTROL_CASES.items():
        latents = randn((4, CONTROL_SIZE // 8, CONTROL_SIZE // 8), generators([42]), "cpu")
        with torch.no_grad():
            out[name] = pipe(prompt=PROMPT, negative_prompt="", image=edge_map(), controlnet_conditioning_scale=weight,
                             control_guidance_start=0.0, control_guidance_end=end, height=CONTROL_SIZE,
                             width=CONTROL_SIZE, num_inference_steps=STEPS, guidance_scale=7.5, eta=0.0,
                             latents=latents, output_type="np").images
    del pipe, net
    gc.collect()
    return out


@pytest.fixture(scope="module")
def ours(sdxl, xl_lora, xl_controlnet, xl_taesd):
    pipe = load(sdxl["fp16"], device="cpu", precision="full")
    assert pipe.cfg == sdxl["config"]
    out = {}
    out["context"], out["pooled"], out["eps"] = our_probes(pipe)
    kw = dict(steps=STEPS, sampler="ddim", cfg_scale=7.5, width=SIZE, height=SIZE, seed=42)
    with mock.patch("kiln.pipeline.generate.start_noise", first_seed_noise):
        out["images"] = pipe.txt2img([PROMPT, OTHER], batch_size=2, **kw).pixels
    taesd = pipe.txt2img(PROMPT, decoder=str(xl_taesd[1]["pth"]), **dict(kw, width=TAESD_SIZE, height=TAESD_SIZE))
    out["taesd"], out["taesd_infotext"] = taesd.pixels, taesd.infotexts[0]
    params = dict(pipe.model.named_parameters())
    lora = pipe.load_lora(xl_lora)
    out["unmatched"] = lora.unmatched
    patched = sorted({p.key for p in lora.patches})
    before = fingerprints(params, patched)
    pipe.set_loras([(lora, 0.0, 0.0)])
    out["weight0_unchanged"] = fingerprints(params, patched) == before
    pipe.set_loras([(lora, 1.0, 1.0)])
    out["lora_context"], out["lora_pooled"], out["lora_eps"] = our_probes(pipe)
    merged = fingerprints(params, patched)
    out["changed_by_merge"] = sum(merged[k] != before[k] for k in patched) / len(patched)
    pipe.set_loras([])
    out["restored"] = fingerprints(params, patched) == before
    if xl_controlnet is not None:
        out["control"] = our_control_runs(pipe, xl_controlnet)
    del pipe, params, before
    gc.collect()
    return out


@pytest.fixture(scope="module")
def reference(sdxl, ours, xl_lora, xl_controlnet, xl_taesd):
    state = sdref.load_float(sdxl["fp16"])
    pipe = sdref.ref_sdxl_pipeline(state, sdxl["tokenizer"])
    del state
    out = {}
    out["context"], out["pooled"], out["eps"] = ref_probes(pipe)
    latents = randn((4, SIZE // 8, SIZE // 8), generators([42]), "cpu").repeat(2, 1, 1, 1)  # kiln's seed rule
    with torch.no_grad():
        out["images"] = pipe(prompt=[PROMPT, OTHER], negative_prompt=[""] * 2, height=SIZE, width=SIZE,
                             num_inference_steps=STEPS, guidance_scale=7.5, eta=0.0, latents=latents,
                             output_type="np").images
    if xl_controlnet is not None:
        out["control"] = ref_control_runs(pipe, xl_controlnet)
    vae = pipe.vae
    pipe.vae = taesdref.diffusers_tiny(xl_taesd[0])
    latents = randn((4, TAESD_SIZE // 8, TAESD_SIZE // 8), generators([42]), "cpu")
    with torch.no_grad():
        out["taesd"] = pipe(prompt=PROMPT, negative_prompt="", height=TAESD_SIZE, width=TAESD_SIZE,
                            num_inference_steps=STEPS, guidance_scale=7.5, eta=0.0, latents=latents,
                            output_type="np").images
    pipe.vae = vae
    pipe.load_lora_weights(load_file(str(xl_lora)))
    out["lora_context"], out["lora_pooled"], out["lora_eps"] = ref_probes(pipe)
    del pipe
    gc.collect()
    return out


def test_text_encoders_match(ours, reference):
    a, b = ours["context"], reference["context"]
    assert a.shape == b.shape == (2, 77, 2048) and a.std() > 0.5
    assert (a[..., :768] - b[..., :768]).abs().max() <= 1e-4  # CLIP ViT-L, penultimate layer
    assert (a[..., 768:] - b[..., 768:]).abs().max() <= 1e-4  # OpenCLIP bigG, penultimate layer
    assert ours["pooled"].std() > 0.1 and (ours["pooled"] - reference["pooled"]).abs().max() <= 1e-4


def test_unet_eps_matches(ours, reference):
    a, b = ours["eps"], reference["eps"]
    assert 0.3 < a.std() < 3.0  # ε at about unit scale
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()


def test_txt2img_matches_diffusers(ours, reference):
    assert ours["images"].shape == (2, SIZE, SIZE, 3)
    assert_pixels_match(ours["images"], reference["images"])
    # the same start noise, one changed word: most pixel values move
    assert (ours["images"][1] != ours["images"][0]).mean() > 0.5


def test_kohya_lora_matches_diffusers_load_lora_weights(ours, reference):
    assert ours["unmatched"] == [] and ours["weight0_unchanged"] and ours["restored"]
    assert ours["changed_by_merge"] == 1.0  # the fingerprints see the merge: every patched weight moved
    for key in ("context", "pooled", "eps"):
        moved = (ours["lora_" + key] - ours[key]).abs().max()
        assert moved > 0.05, f"the LoRA barely changed {key}"  # a real change, so that parity means something
        assert (ours["lora_" + key] - reference["lora_" + key]).abs().max() <= 1e-4, key


@pytest.mark.parametrize("case", list(CONTROL_CASES))
@pytest.mark.skipif(not FULL_CONTROLNET, reason="opt-in: KILN_SDXL_CONTROLNET=1 (23 GB peak, +9 min; "
                    "tests/test_controlnet_sdxl.py checks the same path at tiny widths on every run)")
def test_controlnet_matches_diffusers(ours, reference, case):
    a, b = ours["control"][case], reference["control"][case]
    assert a.shape == (1, CONTROL_SIZE, CONTROL_SIZE, 3)
    diff = np.abs(a.astype(np.float64) / 255.0 - b.astype(np.float64))
    print(f"{case}: {(diff <= 1.0 / 255.0 + 1e-6).mean():.4%} of pixel values within 1/255 "
          f"(max {diff.max() * 255:.1f}/255)")
    assert_pixels_match(a, b)
    moved = (np.abs(a.astype(int) - ours["control"]["none"].astype(int)).max(axis=-1) > 2).mean()
    print(f"{case}: the control moved {moved:.1%} of the pixels")
    assert moved > 0.5, f"the control moved only {moved:.1%} of the pixels"


def test_taesdxl_decoder_matches_diffusers_autoencoder_tiny(ours, reference):
    assert ours["taesd"].shape == (1, TAESD_SIZE, TAESD_SIZE, 3)
    assert_pixels_match(ours["taesd"], reference["taesd"])
    assert "VAE Decoder: TAESD" in ours["taesd_infotext"]
