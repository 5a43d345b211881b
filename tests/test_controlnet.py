"""ControlNet on the embedded demo model with a random ControlNet in lllyasviel's layout: loading (layouts, errors),
the denoiser wrapper (weight, start/end, control modes, several units, batches, AND, hires fix, img2img), the CLI
flags and the infotext. Parity with diffusers on full-size weights: tests/test_parity_controlnet.py."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from kiln.checkpoints.controlnet import load_controlnet
from kiln.errors import CheckpointError, KilnError
from kiln.models.controlnet import ControlNetConfig, ControlNetModel
from kiln.pipeline.control import ControlUnit

KW = dict(steps=6, sampler="euler", seed=1, watermark=False)
PROMPT = "a red circle on a white background"


def write_controlnet(path, unet_cfg, seed=0, prefix="control_model.", dtype=torch.float32):
    """A random ControlNet (sdref's 1/sqrt(fan_in) weights, so that the hint reaches the residuals)."""
    import sdref

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ControlNetModel(ControlNetConfig(unet_cfg)).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():  # the hint block ×1.5 per conv (against SiLU): the hint must reach h
        gain = 1.5 if "input_hint_block" in k and k.endswith("weight") else 1.0
        state[prefix + k] = (sdref.random_tensor(k, shape, gen) * gain).to(dtype)
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def cn(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    return [write_controlnet(root / f"cn{k}.safetensors", pipe.cfg.unet, seed=k) for k in (0, 1)]


@pytest.fixture(scope="module")
def square():
    im = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(im).rectangle([10, 10, 40, 40], outline="white", width=2)
    return im


def moved(a, b, level=8):
    return (np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > level).mean()


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe.txt2img(PROMPT, **KW).pixels


def test_every_layout_loads_the_same_tensors(pipe, cn, tmp_path):
    ref = load_controlnet(cn[0]).state_dict()
    for path, prefix, dtype in ((tmp_path / "bare.safetensors", "", torch.float32),
                                (tmp_path / "half.pth", "control_model.", torch.float16)):
        write_controlnet(path, pipe.cfg.unet, seed=0, prefix=prefix, dtype=dtype)
        got = load_controlnet(path).state_dict()
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k].to(dtype).float(), atol=0, rtol=0)


def test_clear_errors_for_files_that_are_not_controlnets(pipe, tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "x.safetensors")
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1), "unet.x": torch.zeros(1)},
              str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'unet.x'"):
        load_controlnet(tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors")


def test_a_controlnet_for_another_base_model_is_refused(pipe, square, tmp_path):
    from dataclasses import replace

    other = write_controlnet(tmp_path / "other.safetensors", replace(pipe.cfg.unet, context_dim=96))
    with pytest.raises(KilnError, match="made for"):
        pipe.txt2img(PROMPT, controlnets=[ControlUnit(other, square)], **KW)


def test_weight_start_end_and_modes(pipe, cn, square, plain):
    run = lambda **kw: pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], square, **kw)], **KW)
    full = run().pixels
    assert moved(plain, full) > 0.5  # a random ControlNet moves most pixels
    assert np.array_equal(run(weight=0.0).pixels, plain)  # weight 0: no control at all
    late = run(start=0.5).pixels
    assert 0 < moved(plain, late) < moved(plain, full)
    for mode in (1, 2, "ControlNet is more important"):
        assert moved(full, run(control_mode=mode).pixels) > 0.1, mode
    with pytest.raises(KilnError, match="start and end"):
        run(start=0.6, end=0.4)
    with pytest.raises(KilnError, match="control mode"):
        run(control_mode="loud")


def test_two_units_add_up(pipe, cn, square, plain):
    circle = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(circle).ellipse([20, 20, 60, 60], outline="white", width=2)
    one = pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], square)], **KW)
    both = pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], square), ControlUnit(cn[1], circle, 0.7)], **KW)
    assert moved(one.pixels, both.pixels) > 0.2
    assert "ControlNet 0: " in both.infotexts[0] and "ControlNet 1: " in both.infotexts[0]
    assert "Weight: 0.7" in both.infotexts[0]


def test_batches_and_and_prompts_get_the_control_on_every_row(pipe, cn, square):
    unit = [ControlUnit(cn[0], square)]
    single = pipe.txt2img(PROMPT, controlnets=unit, **KW).pixels
    batch = pipe.txt2img(PROMPT, controlnets=unit, **{**KW, "batch_size": 2}).pixels
    assert np.abs(batch[0].astype(int) - single[0].astype(int)).max() <= 1
    zero = pipe.txt2img(PROMPT + " AND a blue star :0", controlnets=unit, **KW).pixels
    assert np.abs(zero.astype(int) - single.astype(int)).max() <= 1


def test_hires_fix_and_img2img_with_a_unit(pipe, cn, square):
    unit = [ControlUnit(cn[0], square, module="canny")]
    hires = pipe.txt2img(PROMPT, controlnets=unit, hires_scale=2.0, hires_steps=2, **KW)
    assert hires.pixels.shape[1:3] == (128, 128)
    init = Image.new("RGB", (64, 64), "white")
    plain = pipe.img2img(PROMPT, init, strength=0.8, **KW).pixels
    ruled = pipe.img2img(PROMPT, init, strength=0.8, controlnets=unit, **KW).pixels
    assert moved(plain, ruled) > 0.3
    assert "Module: canny" in hires.infotexts[0]


def test_cli_flags(cn, square, tmp_path, capsys):
    from kiln.cli import main

    square.save(tmp_path / "square.png")
    base = ["txt2img", "--prompt", PROMPT, "--outdir", str(tmp_path / "out"), "--n_samples", "1", "--n_iter", "1",
            "--ddim_steps", "4", "--no-watermark"]
    args = base + ["--controlnet", str(cn[0]), "--controlnet", str(cn[1]), "--control-image",
                   str(tmp_path / "square.png"), "--control-weight", "0.5", "--control-weight", "0.8"]
    assert main(args) == 0
    text = Image.open(tmp_path / "out" / "samples" / "00000.png").text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: cn0 [' in text and "Weight: 0.8" in text
    assert main(base + ["--control-image", "x.png"]) == 1
    assert "needs --controlnet" in capsys.readouterr().err
    assert main(args + ["--control-end", "0.5", "--control-end", "0.6", "--control-end", "0.7"]) == 1
    assert "given 3 times for 2 ControlNet units" in capsys.readouterr().err
    assert main(base + ["--controlnet", str(cn[0]), "--control-image", str(tmp_path / "square.png"),
                        "--control-preprocessor", "openpose"]) == 1
    assert "openpose" in capsys.readouterr().err


def test_from_png_makes_the_image_again_with_its_units(cn, square, tmp_path, capsys):
    """The infotext names each unit's model and settings, not its control image: --from-png takes the settings,
    finds the models by title in --controlnet-dir, and asks for the control images."""
    import shutil

    from kiln.cli import main

    square.save(tmp_path / "square.png")
    models = tmp_path / "models"
    models.mkdir()
    for f in cn:
        shutil.copy(f, models)
    out = tmp_path / "out"
    base = ["txt2img", "--prompt", PROMPT, "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "4",
            "--no-watermark", "--seed", "3"]
    assert main(base + ["--outdir", str(out), "--controlnet", str(models / cn[0].name), "--controlnet",
                        str(models / cn[1].name), "--control-image", str(tmp_path / "square.png"),
                        "--control-weight", "0.7", "--control-weight", "1.2", "--control-end", "0.5",
                        "--control-end", "1", "--control-mode", "control", "--control-mode", "0",
                        "--control-preprocessor", "invert", "--control-preprocessor", "none"]) == 0
    first = out / "samples" / "00000.png"
    text = Image.open(first).text["parameters"]
    assert "Control Mode: ControlNet is more important" in text and "Module: invert" in text
    again = ["txt2img", "--from-png", str(first), "--outdir", str(tmp_path / "again"),
             "--controlnet-dir", str(models), "--control-image", str(tmp_path / "square.png")]
    assert main(again) == 0
    remade = Image.open(tmp_path / "again" / "samples" / "00000.png")
    assert np.array_equal(np.asarray(remade), np.asarray(Image.open(first)))
    assert remade.text["parameters"] == text
    assert main(again[:-2]) == 1
    assert "does not keep control images: pass --control-image" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(again[:3] + ["--outdir", str(tmp_path / "x"), "--controlnet-dir", str(tmp_path / "empty"),
                             "--control-image", str(tmp_path / "square.png")]) == 1
    assert "ControlNet 0: cn0 [" in capsys.readouterr().err


def test_batch_rows_name_control_images(pipe, cn, square, tmp_path):
    """`kiln batch`: a row's control_image (relative to the prompts file) with the run's --controlnet, several
    units from a JSONL row's lists, and one-line errors for rows that cannot run."""
    import json

    from kiln.demo.report import EMBEDDED
    from kiln.distributed.batch import run_batch
    from kiln.pipeline import GenerationParams

    square.save(tmp_path / "square.png")
    rows = [{"prompt": PROMPT, "seed": 5, "control_image": "square.png"},
            {"prompt": PROMPT, "seed": 5},
            {"prompt": PROMPT, "seed": 5, "controlnet": [str(cn[0]), str(cn[1])], "control_image": "square.png",
             "control_weight": [0.5, 1.5], "control_mode": 2},
            {"prompt": PROMPT, "control_image": "missing.png"},
            {"prompt": PROMPT, "control_image": "square.png", "control_end": 2}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_batch(tmp_path / "rows.jsonl", str(tmp_path / "out"), ckpt=str(EMBEDDED), progress=False,
                  defaults=GenerationParams.make(steps=4, sampler="euler"), controlnets=[str(cn[1])])
    assert (s.ok, s.errors) == (3, 2)
    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert "missing.png: no such file" in entries[3]["error"]
    assert "guidance start and end" in entries[4]["error"]
    got = [np.asarray(Image.open(tmp_path / "out" / e["file"])) for e in entries[:3]]
    unit = dict(image=tmp_path / "square.png")
    same = dict(steps=4, sampler="euler", seed=5)
    assert np.array_equal(got[0], pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[1], **unit)], **same).pixels[0])
    assert moved(got[0], got[1]) > 0.1
    two = [ControlUnit(cn[0], weight=0.5, control_mode=2, **unit), ControlUnit(cn[1], weight=1.5, control_mode=2,
                                                                                **unit)]
    assert np.array_equal(got[2], pipe.txt2img(PROMPT, controlnets=two, **same).pixels[0])
    assert 'ControlNet 1: "Module: none, Model: cn1 [' in Image.open(tmp_path / "out" / entries[2]["file"]).text[
        "parameters"]


def test_diffusers_layout_folder_and_file_load_the_same_tensors(pipe, cn, tmp_path):
    """A diffusers ControlNetModel written by diffusers itself (its own converter from the lllyasviel file, then
    save_pretrained) loads to exactly the lllyasviel file's tensors: folder and single file."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, \
        create_unet_diffusers_config_from_ldm
    from safetensors.torch import load_file

    u = pipe.cfg.unet
    unet_params = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                       attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
                       channel_mult=list(u.channel_mult), num_heads=u.num_heads, context_dim=u.context_dim,
                       transformer_depth=1, use_linear_in_transformer=u.use_linear_in_transformer)
    original = {"model": {"params": {"unet_config": {"params": unet_params}, "first_stage_config": {"params": {
        "ddconfig": {"ch_mult": [1, 2, 2]}}}}}}
    checkpoint = load_file(str(cn[0]))
    unet_like = {"model.diffusion_model." + k[len("control_model."):]: v for k, v in checkpoint.items()}
    cfg = create_unet_diffusers_config_from_ldm(original, unet_like)
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection")
    ref = diffusers.ControlNetModel(conditioning_channels=3, **{k: cfg[k] for k in keep})
    ref.load_state_dict(convert_controlnet_checkpoint(checkpoint, cfg), strict=True)
    ref.save_pretrained(tmp_path / "folder")
    want = load_controlnet(cn[0]).state_dict()
    for path in (tmp_path / "folder", tmp_path / "folder" / "diffusion_pytorch_model.safetensors"):
        got = load_controlnet(path).state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)


def test_an_sdxl_controlnet_in_diffusers_layout_gives_diffusers_residuals(tmp_path):
    """SDXL's layout at a tiny size (a level without attention, 2 transformer layers on the next, linear projections,
    the vector embedding `add_embedding` → `label_emb`): kiln's loader on diffusers' own `save_pretrained` folder,
    and the residuals for the same latents, hint, context and vector (pooled text + time-id embedding) as diffusers'
    `added_cond_kwargs` gives them. Full size, in the pipelines: tests/test_parity_sdxl.py."""
    diffusers = pytest.importorskip("diffusers")
    from kiln.models.unet import UNetConfig, timestep_embedding

    torch.manual_seed(0)
    ref = diffusers.ControlNetModel(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], block_out_channels=[32, 64], layers_per_block=2,
        cross_attention_dim=64, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8).eval()
    trained = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    with torch.no_grad():  # the zero convolutions and the hint's last conv far from zero: the residuals carry all
        for name, param in ref.named_parameters():
            if name.startswith(trained):
                param.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "xl")
    base = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=2,
                      num_heads=-1, num_head_channels=16, transformer_depth=(1, 2), context_dim=64,
                      use_linear_in_transformer=True, adm_in_channels=80)
    ours = load_controlnet(tmp_path / "xl", base=base)
    assert ours.cfg.unet == replace(base, out_channels=4)
    gen = torch.Generator().manual_seed(1)
    x, hint = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    context, pooled = torch.randn(2, 7, 64, generator=gen), torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [128.0, 96.0, 8.0, 4.0, 64.0, 64.0]])
    t = torch.tensor([999, 261])
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], dim=1)
    with torch.no_grad():
        got = ours(x, hint, t, context, y)
        down, mid = ref(x, t, context, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        return_dict=False)
    want = [*down, mid]
    assert len(got) == len(want) == 7
    for a, b in zip(got, want):
        assert a.std() > 0.1
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_under_medvram_the_controlnet_is_one_more_offloaded_part(cn, square):
    import kiln
    from kiln.demo.report import EMBEDDED

    pipe = kiln.load(EMBEDDED, device="cpu")
    want = pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], square)], **KW).pixels
    pipe = kiln.load(EMBEDDED, device="cpu")
    pipe.offload("medvram")
    got = pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], square)], **KW)
    net = next(iter(pipe._controlnets.values()))
    assert any(part is net for part in pipe.offloader.parts)
    assert np.array_equal(got.pixels, want)


def test_inpaint_units_get_the_masked_input(pipe, cn, square, tmp_path):
    from kiln.pipeline.control import control_map

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 31, 63], fill=255)
    hint, _ = control_map(ControlUnit(cn[0], square, module="inpaint"), 0, 64, 64, mask)
    assert (hint[:, :32] == -1).all() and (hint[:, 32:] >= 0).all()
    init = Image.new("RGB", (64, 64), "white")
    kw = dict(KW, strength=0.9, mask=mask)
    plain = pipe.img2img(PROMPT, init, controlnets=[ControlUnit(cn[0], init)], **kw).pixels
    inpaint = pipe.img2img(PROMPT, init, controlnets=[ControlUnit(cn[0], init, module="inpaint")], **kw).pixels
    assert moved(plain, inpaint) > 0.1
    with pytest.raises(KilnError, match="needs a mask"):
        pipe.txt2img(PROMPT, controlnets=[ControlUnit(cn[0], init, module="inpaint")], **KW)
