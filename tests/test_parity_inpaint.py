"""9-channel inpainting checkpoints (sd-v1-5-inpainting layout) against diffusers' StableDiffusionInpaintPipeline,
on random full-size weights converted by diffusers' own converter."""
import gc
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdref
from kiln.models import ModelConfig, UNetConfig
from kiln.pipeline import generators, randn

pytestmark = pytest.mark.slow

PROMPT = "a red cube on a blue table"


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory):
    cfg = replace(ModelConfig(), family="sd1-inpaint", unet=replace(UNetConfig(), in_channels=9))
    state = sdref.random_state(cfg, seed=5)
    sdref.calibrate(state, cfg)
    path = tmp_path_factory.mktemp("inpaint") / "sd15-inpainting.safetensors"
    save_file({**state, **sdref.schedule_buffers(cfg)}, path)
    del state
    gc.collect()
    return path


def test_inpainting_model_matches_diffusers(inpaint_ckpt, sd15):
    import kiln

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask_im = Image.fromarray(mask)

    pipe = kiln.load(inpaint_ckpt, device="cpu", precision="full")
    assert pipe.cfg.unet.in_channels == 9
    r = pipe.img2img(PROMPT, init, mask=mask_im, mask_blur=0, strength=1.0, steps=10, cfg_scale=7.5, seed=42,
                     sampler="ddim")
    ours_latents, ours_pixels = r.latents.clone(), r.pixels.copy()
    x = torch.from_numpy(np.asarray(init)).permute(2, 0, 1)[None].float() / 127.5 - 1
    hard = torch.from_numpy((mask >= 128).astype(np.float32))[None, None]
    masked_latents = pipe.encode_images(x * (1 - hard)).float()  # the posterior mean, as kiln uses it
    del pipe
    gc.collect()

    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    state = sdref.load_float(inpaint_ckpt)
    ref = StableDiffusionInpaintPipeline(
        vae=sdref.ref_vae(state), text_encoder=sdref.ref_clip(state), tokenizer=sdref.hf_tokenizer(sd15["tokenizer"]),
        unet=sdref.ref_unet(state, in_channels=9),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    del state
    gc.collect()
    latents = randn((4, 8, 8), generators([42]), "cpu")
    kw = dict(prompt=[PROMPT], image=init, mask_image=mask_im, masked_image_latents=masked_latents, height=64,
              width=64, num_inference_steps=10, guidance_scale=7.5, eta=0.0, strength=1.0, latents=latents)
    with torch.no_grad():
        ref_latents = ref(**kw, output_type="latent").images
        # the pipeline's own decode and post-processing of those latents (what output_type="np" runs after them)
        decoded = ref.vae.decode(ref_latents / ref.vae.config.scaling_factor).sample
        ref_pixels = ref.image_processor.postprocess(decoded, output_type="np")
    del ref
    gc.collect()
    err = (ours_latents - ref_latents).abs().max().item()
    assert err <= 5e-4, f"final latents differ by {err}"
    inside = mask >= 128
    diff = np.abs(ours_pixels[0].astype(np.float64) / 255 - ref_pixels[0].astype(np.float64))[inside]
    assert (diff <= 1 / 255 + 1e-6).mean() >= 0.999, f"max {diff.max() * 255:.1f}/255"
    assert np.array_equal(ours_pixels[0][~inside], np.asarray(init)[~inside])  # kiln pastes the original back
    assert ref_pixels.std() > 0.05
