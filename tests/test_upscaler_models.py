"""Upscaler networks (kiln/models/upscalers) and their loader (kiln/checkpoints/upscaler.py) against spandrel, the
library ComfyUI and chaiNNer load these files with (test-only; see tests/upscaler_ref.py for how it is imported).

Each architecture, in each file layout it ships in, gets random weights, scaled so that every layer's output stays
near unit size (He-style 1/sqrt(fan_in) weights), written to a file; kiln and spandrel each load that file with their
own detection and run an input of odd size (48×40, and sizes that need padding); kiln's unclamped output must be
within 1/255 of spandrel's on ≥ 99.9% of the values. Then the bad files: unknown architecture, a checkpoint of another
kind, a pickle with code, a truncated file."""
from __future__ import annotations

import math
import re

import pytest
import torch
import upscaler_ref as ref

from kiln.checkpoints.upscaler import load_upscaler, upscaler_arch
from kiln.errors import CheckpointError
from kiln.models.upscalers.compact import SRVGGNetCompact
from kiln.models.upscalers.dat import DAT
from kiln.models.upscalers.esrgan import RRDBNet
from kiln.models.upscalers.swinir import SwinIR

TOL = 1 / 255
# spandrel's SwinIR and DAT call torch.meshgrid without indexing= (their code, not kiln's)
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")


def randomize(state: dict, seed: int = 0, special=None, gain: float = 2.0) -> dict:
    """Random weights of the shapes in `state`: ≥2-D weights N(0, gain/fan_in) (gain 2 against ReLU-like halving),
    biases N(0, 0.05²); 1-D weights as `special(key)` says (PReLU slopes, norm scales) or 1 + N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point() or k.endswith(("attn_mask", "attn_mask_0", "attn_mask_1", "rpe_biases")):
            # derived buffers (index and offset tables, the shifted windows' masks) stay as the class made them
            out[k] = v
            continue
        shape = tuple(v.shape)
        noise = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            out[k] = noise * math.sqrt(gain / math.prod(shape[1:]))
        elif k.endswith("bias"):
            out[k] = noise * 0.05
        else:
            out[k] = special(k, noise) if special else 1 + 0.1 * noise
    return out


def image(h=40, w=48, seed=1):
    """A smooth random image in [0, 1] (a blurred noise field: real images are not white noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, (h + 3) // 4 + 2, (w + 3) // 4 + 2, generator=gen)
    x = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    return (x[..., :h, :w] + 0.1 * torch.rand(1, 3, h, w, generator=gen)).clamp(0, 1)


def check_parity(path, expect_arch: str, spandrel_arch: str, scale: int, sizes=((40, 48),)):
    """kiln and spandrel load `path`; outputs must agree within 1/255 on ≥ 99.9% of values at each (h, w)."""
    model = load_upscaler(path)
    assert (model.arch, model.scale, model.name, model.dtype) == (expect_arch, scale, path.stem, torch.float32)
    assert not model.training and upscaler_arch(path) == expect_arch
    desc = ref.spandrel_load(path, spandrel_arch)
    assert desc.scale == scale
    for h, w in sizes:
        x = image(h, w)
        with torch.no_grad():
            ours = model(x)
        theirs = ref.spandrel_run(desc, x)
        assert ours.shape == theirs.shape == (1, 3, h * scale, w * scale)
        assert 0.05 < theirs.std() < 3, "the random weights give a degenerate output: the test would prove little"
        close = ((ours - theirs).abs() <= TOL).float().mean().item()
        assert close >= 0.999, f"{path.name} {h}x{w}: only {close:.4%} of values within 1/255 of spandrel's"
    return model


# ---------------------------------------------------------------------------------------------------- ESRGAN

def original_esrgan(path, scale=4, nf=16, nb=2, in_nc=3, shuffle=None, seed=0, wrapper=None, out_gain=1.0,
                    plus=False):
    """The original ESRGAN `model.N` layout, from spandrel's own network class (its names, not kiln's); `out_gain`
    scales the last conv (a deep random trunk grows its features far past unit size); `plus`: ESRGAN+."""
    net = ref.network("ESRGAN", in_nc=in_nc, out_nc=3, num_filters=nf, num_blocks=nb, scale=scale,
                      shuffle_factor=shuffle, plus=plus)
    state = randomize(net.state_dict(), seed)
    last = max(state, key=lambda k: int(k.split(".")[1]))
    state[last] *= out_gain
    return ref.save(state, path, wrapper)


@pytest.mark.parametrize("scale,suffix", [(1, ".safetensors"), (2, ".pth"), (4, ".pth"), (8, ".safetensors")])
def test_esrgan_original_layout(tmp_path, scale, suffix):
    path = original_esrgan(tmp_path / f"esrgan{scale}x{suffix}", scale=scale)
    model = check_parity(path, "ESRGAN", "ESRGAN", scale, sizes=[(40, 48), (7, 5)])
    assert (len(model.body), model.conv_first.out_channels) == (2, 16)


def test_esrgan_plus(tmp_path):
    """ESRGAN+ (a 1×1 shortcut into each dense block's 2nd and 4th outputs), only ever in the original layout."""
    model = check_parity(original_esrgan(tmp_path / "4x_ESRGANplus.pth", plus=True), "ESRGAN", "ESRGAN", 4)
    assert model.body[0].rdb1.conv1x1 is not None


def basicsr_state(scale=4, nf=16, nb=2, shuffle=1, seed=0) -> dict:
    """BasicSR's / Real-ESRGAN's RRDBNet names (kiln's module mirrors them; spandrel renames them to its own)."""
    up = {1: 2, 2: 2, 4: 2, 8: 3}[scale] if shuffle > 1 else int(math.log2(scale))
    net = RRDBNet(in_nc=3 * shuffle**2, nf=nf, nb=nb, upsamples=up, shuffle=shuffle)
    return randomize(net.state_dict(), seed)


@pytest.mark.parametrize("wrapper,suffix", [("params_ema", ".pth"), ("params", ".pth"), (None, ".safetensors")])
def test_esrgan_basicsr_layout(tmp_path, wrapper, suffix):
    path = ref.save(basicsr_state(), tmp_path / f"RealESRGAN_x4plus{suffix}", wrapper)
    check_parity(path, "ESRGAN", "ESRGAN", 4)


@pytest.mark.parametrize("scale,shuffle", [(2, 2), (1, 4)])
def test_esrgan_pixel_unshuffle(tmp_path, scale, shuffle):
    """Real-ESRGAN x2plus (and the 1× models) fold the input by pixel-unshuffle into a 4× body; odd sizes are padded
    (by reflection) to multiples of 4 first, and a 1×1 image to 4×4."""
    path = ref.save(basicsr_state(scale, shuffle=shuffle), tmp_path / f"RealESRGAN_x{scale}plus.pth", "params_ema")
    model = check_parity(path, "ESRGAN", "ESRGAN", scale, sizes=[(40, 48), (37, 29)])
    assert model.conv_first.in_channels == 3 * shuffle**2
    assert model(image(1, 1)).shape == (1, 3, scale, scale)
    # spandrel's original-layout class writes the same network under model.N names
    path = original_esrgan(tmp_path / f"old_x{scale}.pth", scale=4, in_nc=3 * shuffle**2, shuffle=shuffle)
    check_parity(path, "ESRGAN", "ESRGAN", scale)


def test_esrgan_bsrgan_layout_and_prefixes(tmp_path):
    """BSRGAN/RealSR's names (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`), under DataParallel's `module.`."""
    rename = [(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2."), (r"^conv_body\.", "trunk_conv."),
              (r"^conv_up(\d)\.", r"upconv\1."), (r"^conv_hr\.", "HRconv.")]
    state = {}
    for k, v in basicsr_state().items():
        for pattern, repl in rename:
            k = re.sub(pattern, repl, k)
        state["module." + k] = v
    check_parity(ref.save(state, tmp_path / "BSRGAN.pth"), "ESRGAN", "ESRGAN", 4)


def test_esrgan_full_size(tmp_path):
    """A realistic 4× ESRGAN (23 RRDBs of 64 channels, 16.7 M parameters) in the original layout, as 4x-UltraSharp
    and most community models ship."""
    path = original_esrgan(tmp_path / "4x-Full.pth", nf=64, nb=23, out_gain=1 / 200)
    model = check_parity(path, "ESRGAN", "ESRGAN", 4, sizes=[(24, 20)])
    assert sum(p.numel() for p in model.parameters()) == 16_697_987


# ---------------------------------------------------------------------------------------------------- compact

def compact_file(path, scale=4, nf=16, num_conv=4, wrapper=None, seed=0):
    net = ref.network("Compact", num_in_ch=3, num_out_ch=3, num_feat=nf, num_conv=num_conv, upscale=scale)
    prelu = lambda k, noise: 0.25 + 0.1 * noise  # PReLU slopes near their usual 0.25
    return ref.save(randomize(net.state_dict(), seed, prelu), path, wrapper)


@pytest.mark.parametrize("scale,wrapper,suffix", [(4, "params", ".pth"), (2, None, ".safetensors"), (1, None, ".pt")])
def test_compact(tmp_path, scale, wrapper, suffix):
    """realesr-general-x4v3 / realesr-animevideov3 (SRVGGNetCompact) at 4×, 2× and 1×."""
    path = compact_file(tmp_path / f"realesr-general-x{scale}v3{suffix}", scale=scale, wrapper=wrapper)
    model = check_parity(path, "RealESRGAN compact", "Compact", scale, sizes=[(40, 48), (5, 3)])
    assert isinstance(model, SRVGGNetCompact) and len(model.body) == 2 + 2 * 4 + 1


# ---------------------------------------------------------------------------------------------------- SwinIR

def swinir_file(path, wrapper="params_ema", seed=0, **hyper):
    """A small SwinIR from spandrel's class (its tensor names and buffers, as the released files have them)."""
    args = dict(img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=8, mlp_ratio=2.0)
    net = ref.network("SwinIR", **{**args, **hyper})
    return ref.save(randomize(net.state_dict(), seed, gain=1.0), path, wrapper)  # gain 1: residual stacks, GELU


SWINIR_VARIANTS = {
    # name: (spandrel's hyperparameters, scale)
    "classical_x2": (dict(upscale=2, upsampler="pixelshuffle"), 2),
    "classical_x3_3conv": (dict(upscale=3, upsampler="pixelshuffle", resi_connection="3conv"), 3),
    "classical_x8": (dict(upscale=8, upsampler="pixelshuffle"), 8),
    "lightweight_x4": (dict(upscale=4, upsampler="pixelshuffledirect"), 4),
    "realSR_x4_GAN": (dict(upscale=4, upsampler="nearest+conv", resi_connection="3conv"), 4),
    "realSR_x2": (dict(upscale=2, upsampler="nearest+conv"), 2),
    "denoise_x1": (dict(upscale=1, upsampler=""), 1),
    "jpeg_w7": (dict(upscale=1, upsampler="", window_size=7, img_size=28, img_range=255.0), 1),
    # a first conv behind a pixel-unshuffle (`conv_first.1`, as neosr writes it): a 4× body gives 2×
    "unshuffle_x2": (dict(upscale=4, upsampler="pixelshuffle", start_unshuffle=2), 2),
}


@pytest.mark.parametrize("variant", list(SWINIR_VARIANTS))
def test_swinir(tmp_path, variant):
    hyper, scale = SWINIR_VARIANTS[variant]
    suffix = ".safetensors" if "x2" in variant else ".pth"
    path = swinir_file(tmp_path / f"SwinIR_{variant}{suffix}", None if suffix == ".safetensors" else "params", **hyper)
    sizes = [(40, 48), (5, 3)] + ([(29, 37)] if scale < 8 else [])  # padded to whole windows, and to 16 pixels
    if "unshuffle" in variant:
        # spandrel's class names that conv `conv_first` and pads before unshuffling, so that only sizes whose halves
        # are whole windows run there
        state = {k.replace("conv_first.", "conv_first.1."): v for k, v in ref.read(path).items()}
        path, sizes = ref.save(state, path), [(48, 64)]
    model = check_parity(path, "SwinIR", "SwinIR", scale, sizes=sizes)
    assert isinstance(model, SwinIR) and model.window == hyper.get("window_size", 8)
    if "unshuffle" in variant:  # kiln pads to whole windows after the unshuffle: any size runs
        with torch.no_grad():
            assert model(image(29, 37)).shape == (1, 3, 58, 74)
    assert [len(layer.residual_group.blocks) for layer in model.layers] == [2, 2]


# ---------------------------------------------------------------------------------------------------- DAT

DAT_VARIANTS = {
    # name: (spandrel's hyperparameters, scale). Narrow (64 channels: DAT's position-bias MLP is dim/32 wide) and
    # shallow, but each group deep enough for the shifted-window blocks (block 2 of even groups, 0 of odd ones).
    "DAT_x4": (dict(split_size=[8, 32], expansion_factor=4.0, upscale=4), 4),
    "DAT_S_x2": (dict(split_size=[8, 16], expansion_factor=4.0, upscale=2), 2),
    "DAT_2_x3": (dict(split_size=[8, 32], expansion_factor=2.0, upscale=3, resi_connection="3conv"), 3),
    "DAT_light_x4": (dict(split_size=[8, 32], expansion_factor=2.0, upscale=4, resi_connection="3conv",
                          upsampler="pixelshuffledirect"), 4),
}


@pytest.mark.parametrize("variant", list(DAT_VARIANTS))
def test_dat(tmp_path, variant):
    hyper, scale = DAT_VARIANTS[variant]
    args = dict(img_size=64, embed_dim=64, depth=[3, 2], num_heads=[2, 4], **hyper)
    net = ref.network("DAT", **args)
    suffix = ".safetensors" if "S" in variant else ".pth"
    path = ref.save(randomize(net.state_dict(), gain=1.0), tmp_path / f"{variant}{suffix}",
                    None if suffix == ".safetensors" else "params")
    model = check_parity(path, "DAT", "DAT", scale, sizes=[(40, 48), (5, 3)])
    assert isinstance(model, DAT) and model.layers[0].blocks[0].attn.split == tuple(hyper["split_size"])
    assert [b.attn.shifted for b in model.layers[0].blocks[::2]] == [False, True]
    assert model.layers[1].blocks[0].attn.shifted


def test_dtype_device_and_flags(tmp_path):
    """dtype= converts the weights (bfloat16 here: CPU float16 convs are slow); the derived buffers follow; float16
    is flagged unsafe for the transformers, as spandrel flags it."""
    path = compact_file(tmp_path / "c.safetensors")
    full, half = load_upscaler(path), load_upscaler(path, dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and full.supports_half
    x = image(20, 16)
    with torch.no_grad():
        err = (half(x.bfloat16()).float() - full(x)).abs().mean().item()
    assert err < 0.05
    swin = load_upscaler(swinir_file(tmp_path / "s.pth", upscale=2, upsampler="pixelshuffle"), dtype=torch.bfloat16)
    index = swin.layers[0].residual_group.blocks[0].attn.relative_position_index
    assert not swin.supports_half and not index.is_meta
    with torch.no_grad():
        assert swin(image(9, 11).bfloat16()).shape == (1, 3, 18, 22)


def test_batches_and_channels_last(tmp_path):
    """A batch gives each image's own result (the shifted-window masks broadcast over it), and channels-last models
    and inputs (what GPU convs prefer) give the same values."""
    net = ref.network("DAT", img_size=64, embed_dim=64, depth=[3, 2], num_heads=[2, 4], split_size=[8, 16], upscale=2)
    files = [ref.save(randomize(net.state_dict(), gain=1.0), tmp_path / "dat.pth"),
             swinir_file(tmp_path / "swinir.pth", upscale=2, upsampler="nearest+conv"),
             ref.save(basicsr_state(2, shuffle=2), tmp_path / "x2plus.pth")]
    x = torch.cat([image(21, 27), image(21, 27, seed=2)])
    for path in files:
        model = load_upscaler(path)
        with torch.no_grad():
            one = torch.cat([model(x[:1]), model(x[1:])])
            both = model(x)
            model = model.to(memory_format=torch.channels_last)
            last = model(x.to(memory_format=torch.channels_last))
        assert (both - one).abs().max() < 1e-4 and (last - one).abs().max() < 1e-4, path.name


def test_grayscale_model_is_refused(tmp_path):
    net = ref.network("Compact", num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2)
    path = ref.save(randomize(net.state_dict()), tmp_path / "gray.pth")
    with pytest.raises(CheckpointError, match=r"gray\.pth: a RealESRGAN compact model for 1-channel images"):
        load_upscaler(path)


# ---------------------------------------------------------------------------------------------------- bad files

class _Payload:
    """Pickles as a call of os.system (posix.system) that would create `marker`: what a malicious file holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def expect_error(path, *fragments):
    for fn in (load_upscaler, upscaler_arch):
        with pytest.raises(CheckpointError) as err:
            fn(path)
        text = str(err.value)
        assert "\n" not in text and str(path) in text, text
        for fragment in fragments:
            assert fragment in text, text
    return text


def test_bad_files(tmp_path):
    t = torch.zeros(4, 4)
    expect_error(ref.save({"encoder.conv.weight": t, "head.fc.bias": t[0]}, tmp_path / "mystery.pth"),
                 "unknown architecture", "'encoder.conv.weight'", "ESRGAN")
    sd = ref.save({"model.diffusion_model.input_blocks.0.0.weight": t, "first_stage_model.decoder.conv_in.weight": t},
                  tmp_path / "v1-5.ckpt", "state_dict")
    expect_error(sd, "Stable Diffusion checkpoint")
    expect_error(ref.save({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": t}, tmp_path / "lora.safetensors"),
                 "a LoRA")
    expect_error(ref.save({"control_model.input_hint_block.0.weight": t}, tmp_path / "cn.safetensors"), "ControlNet")
    expect_error(tmp_path / "missing.pth", "no such file")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    expect_error(tmp_path / "model.onnx", "not an upscaler file type")


def test_pickle_with_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}, "x": _Payload(marker)}, path)
    expect_error(path, "refusing to load", "system")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = original_esrgan(tmp_path / f"cut{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(path, "truncated")


def test_wrong_shapes_name_the_layout(tmp_path):
    """A file that looks like ESRGAN but whose tensors do not fit one: named, not a traceback from load_state_dict."""
    state = basicsr_state()
    state["conv_hr.weight"] = state["conv_hr.weight"][:, :8]
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: does not match its detected ESRGAN layout"):
        load_upscaler(ref.save(state, tmp_path / "odd.safetensors"))
