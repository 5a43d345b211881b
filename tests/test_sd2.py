"""SD 2.x handling on a tiny random model of its architecture (OpenCLIP names, linear projections, 64-channel
heads): detection from names and shapes, ε/v from a yaml beside the file, from A1111's test on the weights, or
from --prediction; the penultimate text layer; the CLI end to end."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import sdref
from kiln.checkpoints import detect, guess_v_prediction, load_model, open_file
from kiln.cli import main
from kiln.models import CLIPTextConfig, ModelConfig, UNetConfig


def tiny_sd2_config():
    return ModelConfig(
        family="sd2",
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                        num_heads=-1, num_head_channels=64, context_dim=64, use_linear_in_transformer=True,
                        upcast_attention=True),
        vae=sdref.tiny_config().vae,
        text=CLIPTextConfig(kind="openclip", width=64, layers=3, heads=1, mlp_width=128, act="gelu", projection=64),
        text_skip=1, watermark="SDV2")


def write_tiny_sd2(path, out_bias=None):
    cfg = tiny_sd2_config()
    state = sdref.random_state(cfg, seed=4)
    sdref.calibrate(state, cfg)
    if out_bias is not None:  # a UNet whose output is the constant `out_bias`
        state["model.diffusion_model.out.2.weight"].zero_()
        state["model.diffusion_model.out.2.bias"].fill_(out_bias)
    save_file(state, path)  # no kiln metadata: everything is read from the names and shapes
    return path


def tiny_yaml(path, parameterization):
    """The upstream v2 yaml with the tiny model's sizes."""
    cfg = yaml.safe_load((sdref.DATA / "v2-inference-v.yaml").read_text())
    p = cfg["model"]["params"]
    if parameterization == "eps":
        p.pop("parameterization")
    u = p["unet_config"]["params"]
    u.update(model_channels=64, channel_mult=[1, 2], attention_resolutions=[2], num_res_blocks=1, context_dim=64)
    dd = p["first_stage_config"]["params"]["ddconfig"]
    dd.update(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return write_tiny_sd2(tmp_path_factory.mktemp("sd2") / "tiny2.safetensors")


def test_detected_as_sd2(tiny2):
    cfg = detect(open_file(tiny2))
    assert cfg == tiny_sd2_config()


@pytest.mark.parametrize("bias,v", [(-3.0, True), (0.0, False), (1.0, False)])
def test_a1111_v_test_reads_the_output_at_t999(tmp_path, bias, v):
    # out − x = bias − 0.5 on the flat 0.5 input: below −1 only for the strongly negative output
    model, info = load_model(write_tiny_sd2(tmp_path / "m.safetensors", out_bias=bias))
    assert guess_v_prediction(model.unet) is v
    assert info.config.parameterization == ("v" if v else "eps")
    assert info.config.native_size == (768 if v else 512)
    assert any("guessed from the weights" in n for n in info.notes)


@pytest.mark.parametrize("param", ["v", "eps"])
def test_yaml_beside_the_file_decides(tmp_path, param):
    path = write_tiny_sd2(tmp_path / "m.safetensors", out_bias=-3.0 if param == "eps" else 0.0)  # guess would differ
    tiny_yaml(tmp_path / "m.yaml", param)
    model, info = load_model(path)
    assert info.config.parameterization == param
    assert any("m.yaml" in n for n in info.notes) and not any("guessed" in n for n in info.notes)
    assert model.cfg.unet == tiny_sd2_config().unet
    # --prediction overrides the yaml
    other = "eps" if param == "v" else "v"
    assert load_model(path, prediction=other)[1].config.parameterization == other


def test_conditioning_is_the_penultimate_layer_with_the_final_norm(tiny2):
    from kiln.pipeline import Pipeline

    model, info = load_model(tiny2, prediction="eps")
    pipe = Pipeline(model, info, torch.device("cpu"), torch.float32)
    assert pipe.tokenizer.pad_id == 0 and pipe.max_clip_skip == 2
    ids = torch.tensor([pipe.tokenizer([""], max_length=77)[0].tolist()])
    text = model.text_model
    with torch.no_grad():
        x = text.token_embedding(ids) + text.positional_embedding
        for block in text.transformer.resblocks[:2]:
            x = block(x)
        want = text.ln_final(x)
        assert torch.allclose(pipe.encode_prompts([""]), want, atol=1e-6)
        assert not torch.allclose(pipe.encode_prompts([""], clip_skip=2), want, atol=1e-3)


def test_txt2img_cli_on_sd2(tiny2, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(tiny2), "--prompt", "a red circle", "--outdir", str(out), "--H", "64", "--W",
            "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--no-watermark", "--precision", "full"]
    assert main(args + ["--prediction", "v"]) == 0
    v_img = np.asarray(Image.open(out / "samples" / "00000.png"))
    assert main(args + ["--prediction", "eps"]) == 0
    eps_img = np.asarray(Image.open(out / "samples" / "00001.png"))
    assert v_img.shape == (64, 64, 3) and np.abs(v_img.astype(int) - eps_img).mean() > 1
    assert main(args + ["--clip-skip", "3"]) == 1
    assert "clip skip must be between 1 and 2" in capsys.readouterr().err
