import gc
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import sdref  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    """The embedded demo model (64 px shapes), loaded once per test module: a module's tests may change its
    settings (LoRA and embedding folders, DeepCache), which must not leak into another module's."""
    import kiln
    from kiln.demo.report import EMBEDDED

    return kiln.load(EMBEDDED, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny CompVis-layout SD 1.x file (its kiln config in the header), written once per test module."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    sdref.save_tiny(path)
    return path


@pytest.fixture
def cross_attention_lora(tmp_path):
    """A function: a random rank-4 LoRA file (kohya names) on the first cross-attention key projection of
    `model` (a `LatentDiffusion`), returned as kiln's `loras` argument."""
    def make(model):
        from safetensors.torch import save_file

        key = next(k for k, _ in model.named_parameters() if k.endswith("attn2.to_k.weight"))
        out, inp = dict(model.named_parameters())[key].shape
        name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        g = torch.Generator().manual_seed(0)
        path = tmp_path / "l.safetensors"
        save_file({f"{name}.lora_down.weight": torch.randn(4, inp, generator=g),
                   f"{name}.lora_up.weight": torch.randn(out, 4, generator=g), f"{name}.alpha": torch.tensor(4.0)},
                  str(path))
        return [(str(path), 1.0)]
    return make


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    """Random full-size SD 1.5 weights written once per run, in every layout the loader reads:
    fp32 and fp16 CompVis .safetensors, a Lightning .ckpt holding EMA and non-EMA UNet weights (fp16),
    and a diffusers folder written by diffusers' own converters and `save_pretrained`."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd15")
    state = sdref.random_state(seed=0)
    sdref.calibrate(state)
    extra = sdref.schedule_buffers()
    files = {"fp32": root / "sd15-fp32.safetensors", "fp16": root / "sd15-fp16.safetensors",
             "ckpt": root / "sd15-ema.ckpt", "diffusers": root / "sd15-diffusers", "tokenizer": root / "tokenizer"}
    save_file({**state, **extra}, files["fp32"])
    for k in state:
        state[k] = state[k].half()
    save_file({**state, **extra}, files["fp16"])

    # EMA shadow weights: the UNet perturbed by noise of 30% of each tensor's own scale, as LitEma names them.
    gen = torch.Generator().manual_seed(1)
    ema = {}
    for k, v in state.items():
        if k.startswith("model.diffusion_model."):
            v32 = v.float()
            ema[sdref.ema_name(k)] = (v32 + 0.3 * v32.std() * torch.randn(v.shape, generator=gen)).half()
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(840000, dtype=torch.int32)
    torch.save({"state_dict": {**state, **ema, **extra}, "global_step": 840000, "epoch": 6}, files["ckpt"])
    del ema
    gc.collect()

    # A diffusers folder, converted by diffusers itself from the fp16 CompVis weights.
    full = {k: v.float() for k, v in state.items()}
    del state
    sdref.ref_unet(full).save_pretrained(files["diffusers"] / "unet")
    sdref.ref_vae(full).save_pretrained(files["diffusers"] / "vae")
    sdref.ref_clip(full).save_pretrained(files["diffusers"] / "text_encoder")
    del full
    gc.collect()
    sdref.hf_tokenizer_files(files["tokenizer"])
    yield files
    shutil.rmtree(root, ignore_errors=True)  # 15 GB; pytest would keep it for three runs


def random_fp16_weights(tmp_path_factory, name, cfg, seed):
    """Random calibrated weights for `cfg` written as an fp16 CompVis-layout file (fp32 only while generating), plus
    the BPE files for transformers' tokenizer; deleted at the end of the session."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp(name)
    state = sdref.random_state(cfg, seed=seed)
    sdref.calibrate(state, cfg)
    for k in state:
        state[k] = state[k].half()
    files = {"fp16": root / f"{name}-fp16.safetensors", "tokenizer": root / "tokenizer", "config": cfg}
    save_file({**state, **sdref.schedule_buffers(cfg)}, files["fp16"])
    del state
    gc.collect()
    sdref.hf_tokenizer_files(files["tokenizer"])
    yield files
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sd2(tmp_path_factory):
    """Random full-size SD 2.x (v-prediction) weights in the upstream layout, stored fp16 (2.6 GB). The tests
    compute in fp32 from these values."""
    yield from random_fp16_weights(tmp_path_factory, "sd21-v", sdref.sd2_config("v"), seed=2)


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """Random full-size SDXL base weights in the upstream layout, stored fp16 (6.9 GB; 13.8 GB in fp32, so the tests
    hold one model at a time)."""
    yield from random_fp16_weights(tmp_path_factory, "sdxl-base", sdref.sdxl_config(), seed=3)
