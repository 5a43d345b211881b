"""ControlNet parity: random full-size SD 1.5 weights and a random full-size ControlNet in lllyasviel's layout
(`control_model.*`, its zero convolutions random: the control moves the picture), run by kiln and by diffusers'
StableDiffusionControlNetPipeline built from the same files with diffusers' own converters; >= 99.9% of pixel values
within 1/255 for one unit at weight 1, for weight 0.6 ending at half the steps, and for two units."""
import gc

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import sdref
from kiln.models.controlnet import ControlNetConfig, ControlNetModel
from kiln.models.sd import ModelConfig
from kiln.pipeline import generators, randn
from kiln.pipeline.control import ControlUnit

pytestmark = pytest.mark.slow
STEPS, PROMPT = 5, "a red cube on a blue table"


def random_controlnet(unet_state: dict, seed: int) -> dict:
    """A ControlNet as training would start it (its encoder a copy of the UNet's), then every tensor made random
    where training would have moved it: the hint encoder and the zero convolutions (here far from zero)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ControlNetModel(ControlNetConfig(ModelConfig().unet)).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        unet_key = "model.diffusion_model." + k
        if unet_key in unet_state and not k.startswith(("input_hint_block", "zero_convs", "middle_block_out")):
            out["control_model." + k] = unet_state[unet_key].float().clone()
        else:
            out["control_model." + k] = sdref.random_tensor(k, shape, gen)
    return out


def control_images():
    a = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(a).rectangle([12, 12, 44, 44], outline="white", width=2)
    b = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(b).ellipse([20, 8, 60, 48], outline="white", width=3)
    return a, b


@pytest.fixture(scope="module")
def nets(sd15, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("controlnet")
    unet = {k: v for k, v in sdref.load_float(sd15["fp16"]).items() if k.startswith("model.diffusion_model.")}
    paths = []
    for seed in (1, 2):
        state = random_controlnet(unet, seed)
        path = root / f"control_sd15_random{seed}.safetensors"
        save_file({k: v.half() for k, v in state.items()}, str(path))  # as the fp16 "pruned" files
        paths.append(path)
    del unet
    gc.collect()
    return paths


CONFIG_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
               "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")


def ref_controlnet(path, unet_state):
    """diffusers' ControlNetModel from the file, converted by diffusers' `convert_controlnet_checkpoint`. Its
    configuration as diffusers' `create_controlnet_diffusers_config_from_ldm` builds it (the UNet's, from
    cldm_v15.yaml, plus the hint channels); that function itself fails in diffusers 0.42 (it calls the UNet's
    without the checkpoint), hence the few lines here."""
    from diffusers import ControlNetModel as RefControlNet
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, \
        create_unet_diffusers_config_from_ldm

    checkpoint = sdref.load_float(path)
    original = yaml.safe_load((sdref.DATA / "cldm_v15.yaml").read_text())
    unet_cfg = create_unet_diffusers_config_from_ldm(original, unet_state)
    hint = original["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    cfg = {"conditioning_channels": hint, **{k: unet_cfg[k] for k in CONFIG_KEYS if k in unet_cfg}}
    with torch.device("meta"):
        net = RefControlNet(**cfg)
    return sdref._assign(net, convert_controlnet_checkpoint(checkpoint, cfg))


@pytest.fixture(scope="module")
def runs(sd15, nets):
    """kiln's and diffusers' pictures for each case (both pipelines loaded once)."""
    import kiln
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers import MultiControlNetModel

    first, second = control_images()
    cases = {"weight 1": ([(0, first, 1.0, 0.0, 1.0)]),
             "weight 0.6, end 0.5": ([(0, first, 0.6, 0.0, 0.5)]),
             "two units": ([(0, first, 1.0, 0.0, 1.0), (1, second, 0.8, 0.2, 1.0)])}
    ours = {}
    pipe = kiln.load(sd15["fp16"], device="cpu", precision="full")
    kw = dict(steps=STEPS, sampler="ddim", cfg_scale=7.5, seed=42, batch_size=2, width=64, height=64, watermark=False)
    ours["none"] = pipe.txt2img(PROMPT, **kw).pixels
    for name, units in cases.items():
        ours[name] = pipe.txt2img(PROMPT, controlnets=[ControlUnit(nets[k], im, w, s, e) for k, im, w, s, e in units],
                                  **kw).pixels
    del pipe
    gc.collect()
    state = sdref.load_float(sd15["fp16"])
    base = sdref.ref_pipeline(state, sd15["tokenizer"])
    refs = [ref_controlnet(p, state) for p in nets]
    del state
    theirs = {}
    for name, units in cases.items():
        net = refs[units[0][0]] if len(units) == 1 else MultiControlNetModel([refs[k] for k, *_ in units])
        pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in base.components.items()
                                                    if k not in ("image_encoder",)}, controlnet=net)
        one = lambda i, units=units: [u[i] for u in units] if len(units) > 1 else units[0][i]
        latents = randn((4, 8, 8), generators([42, 43]), "cpu")
        with torch.no_grad():
            theirs[name] = pipe(prompt=[PROMPT] * 2, image=one(1), controlnet_conditioning_scale=one(2),
                                control_guidance_start=one(3), control_guidance_end=one(4), height=64, width=64,
                                num_inference_steps=STEPS, guidance_scale=7.5, eta=0.0, latents=latents,
                                output_type="np").images
    return ours, theirs


@pytest.mark.parametrize("case", ["weight 1", "weight 0.6, end 0.5", "two units"])
def test_controlnet_matches_diffusers(runs, case):
    ours, theirs = runs
    diff = np.abs(ours[case].astype(np.float64) / 255.0 - theirs[case].astype(np.float64))
    close = (diff <= 1.0 / 255.0 + 1e-6).mean()
    assert close >= 0.999, f"only {close:.4%} of pixel values within 1/255 (max diff {diff.max() * 255:.1f}/255)"
    assert theirs[case].std() > 0.05
    moved = (np.abs(ours[case].astype(int) - ours["none"].astype(int)).max(axis=-1) > 2).mean()
    print(f"{case}: {close:.4%} of pixel values within 1/255 (max {diff.max() * 255:.1f}/255); the control moved "
          f"{moved:.1%} of the pixels")
    assert moved > 0.5, f"the control moved only {moved:.1%} of the pixels"
