"""SDXL handling on tiny random models of its architecture (two text encoders, vector conditioning): detection,
the conditioning the UNet receives, the CLI end to end. Full-size parity is in test_parity_sdxl.py."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdref
from kiln.checkpoints import detect, load_model, open_file
from kiln.cli import main
from kiln.models import CLIPTextConfig, ModelConfig, UNetConfig
from kiln.models.unet import timestep_embedding
from kiln.pipeline import Pipeline


def tiny_sdxl_config(refiner=False):
    clip = CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128)
    big_g = CLIPTextConfig(kind="openclip", width=96, layers=3, heads=1, mlp_width=128, act="gelu", projection=80)
    texts = (big_g, None) if refiner else (clip, big_g)
    return ModelConfig(
        family="sdxl-refiner" if refiner else "sdxl",
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                        num_heads=-1, num_head_channels=64, transformer_depth=(1, 2),
                        context_dim=sum(t.width for t in texts if t), use_linear_in_transformer=True,
                        adm_in_channels=80 + 256 * (5 if refiner else 6)),
        vae=sdref.tiny_config().vae, text=texts[0], text2=texts[1], text_skip=1, text_final_norm=False,
        scale_factor=0.13025, native_size=1024, watermark="SDXL")


def write_tiny_sdxl(path, refiner=False):
    cfg = tiny_sdxl_config(refiner)
    state = sdref.random_state(cfg, seed=5)
    save_file(state, path)  # no kiln metadata: everything is read from the names and shapes
    return path


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tinyxl.safetensors")


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tinyrefiner.safetensors", refiner=True)


@pytest.mark.parametrize("refiner", [False, True])
def test_detected(tmp_path, refiner):
    assert detect(open_file(write_tiny_sdxl(tmp_path / "m.safetensors", refiner))) == tiny_sdxl_config(refiner)


def pipe_for(path):
    model, info = load_model(path)
    return Pipeline(model, info, torch.device("cpu"), torch.float32)


def test_context_is_both_penultimate_states_and_vector_holds_pooled_and_sizes(tiny_xl):
    pipe = pipe_for(tiny_xl)
    clip, big_g = pipe.model.text_models
    assert [t.pad_id for t in pipe.tokenizers] == [49407, 0]
    cond, uncond = pipe.conditioning(["a red circle"], [""], size=(96, 64))
    ids_l = torch.tensor([pipe.tokenizers[0](["a red circle"], max_length=77)[0].tolist()])
    ids_g = torch.tensor([pipe.tokenizers[1](["a red circle"], max_length=77)[0].tolist()])
    with torch.no_grad():
        want_l = clip(ids_l, skip=1, final_norm=False)  # penultimate, no final norm
        x = big_g.token_embedding(ids_g) + big_g.positional_embedding
        for block in big_g.transformer.resblocks[:-1]:
            x = block(x)
        want_g = x
        pooled = big_g.ln_final(big_g.transformer.resblocks[-1](x))[0, ids_g[0].argmax()] @ big_g.text_projection
    assert cond.context.shape == (1, 77, 64 + 96)
    assert torch.allclose(cond.context[..., :64], want_l, atol=1e-5)
    assert torch.allclose(cond.context[..., 64:], want_g, atol=1e-5)
    assert cond.vector.shape == (1, 80 + 6 * 256)
    assert torch.allclose(cond.vector[0, :80], pooled, atol=1e-5)
    # original (h, w) = (64, 96), crop (0, 0), target (64, 96), 256 sinusoids each, cos first
    sizes = timestep_embedding(torch.tensor([64.0, 96.0, 0.0, 0.0, 64.0, 96.0]), 256).reshape(-1)
    assert torch.allclose(cond.vector[0, 80:], sizes)
    assert not torch.allclose(uncond.vector[0, :80], cond.vector[0, :80])


def test_refiner_vector_carries_the_aesthetic_score(tiny_refiner):
    pipe = pipe_for(tiny_refiner)
    cond, uncond = pipe.conditioning(["a red circle"], ["a red circle"], size=(64, 64))
    assert cond.context.shape == (1, 77, 96) and cond.vector.shape == (1, 80 + 5 * 256)
    assert torch.equal(cond.vector[:, :-256], uncond.vector[:, :-256])  # same prompt: only the score differs
    assert torch.allclose(cond.vector[0, -256:], timestep_embedding(torch.tensor([6.0]), 256)[0])
    assert torch.allclose(uncond.vector[0, -256:], timestep_embedding(torch.tensor([2.5]), 256)[0])


def test_txt2img_cli_on_sdxl(tiny_xl, tmp_path):
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(tiny_xl), "--outdir", str(out), "--H", "64", "--W", "64", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "1", "--no-watermark", "--precision", "full", "--sampler", "euler"]
    assert main(args + ["--prompt", "a red circle"]) == 0
    assert main(args + ["--prompt", "a blue square"]) == 0
    a, b = (np.asarray(Image.open(out / "samples" / f"{i:05}.png")) for i in range(2))
    assert a.shape == (64, 64, 3) and (a != b).mean() > 0.5


@pytest.mark.parametrize("sampler", ["ddim", "euler", "plms"])
def test_refiner_split_is_exact_when_the_refiner_is_the_model_itself(tiny_xl, sampler):
    # Handing the latent over at the switch and going on with the same model must change nothing (DDIM, Euler);
    # PLMS restarts its history at the switch, so there only the first stage is shared.
    pipe = pipe_for(tiny_xl)
    kw = dict(steps=6, sampler=sampler, cfg_scale=5.0, width=64, height=64, seed=3)
    plain = pipe.txt2img("a red circle", **kw).latents
    pipe.set_refiner(pipe, 0.5)
    split = pipe.txt2img("a red circle", **kw)
    assert "Refiner switch at: 0.5" in split.infotexts[0]
    if sampler == "plms":
        assert not torch.equal(plain, split.latents)
    else:
        assert torch.allclose(plain, split.latents, atol=1e-6)


def test_refiner_runs_the_last_steps(tiny_xl, tiny_refiner, tmp_path):
    pipe, ref = pipe_for(tiny_xl), pipe_for(tiny_refiner)
    kw = dict(steps=4, sampler="euler", cfg_scale=5.0, width=64, height=64, seed=3)
    seen = []
    base = pipe.txt2img("a red circle", **kw).latents
    pipe.set_refiner(ref, 1.0)  # switch at the end: the refiner never runs
    assert torch.equal(pipe.txt2img("a red circle", **kw).latents, base)
    pipe.set_refiner(ref, 0.5)
    refined = pipe.txt2img("a red circle", callback=lambda i, n, x, x0: seen.append((i, n)), **kw)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]  # one progress count over both models
    assert not torch.allclose(refined.latents, base, atol=1e-3)
    assert "Refiner: tinyrefiner" in refined.infotexts[0]
    with pytest.raises(Exception, match="between 0 and 1"):
        pipe.set_refiner(ref, 1.5)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_refiner_in_img2img_switches_at_the_same_noise_level(tiny_xl, tiny_refiner, sampler):
    """img2img at strength 0.5 of 8 steps runs steps 4-7 of the schedule; a switch at 0.75 leaves 4-5 to the base
    model and 6-7 to the refiner, exactly the steps txt2img would give the refiner. A switch at 0.25 lies before
    the first step that runs: the refiner runs them all."""
    pipe, ref = pipe_for(tiny_xl), pipe_for(tiny_refiner)
    init = Image.new("RGB", (64, 64), "blue")
    kw = dict(steps=8, sampler=sampler, cfg_scale=5.0, width=64, height=64, seed=3, strength=0.5)
    base = pipe.img2img("a red circle", init, **kw)
    seen = []
    pipe.set_refiner(ref, 0.75)
    refined = pipe.img2img("a red circle", init, callback=lambda i, n, x, x0: seen.append((i, n)), **kw)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert "Refiner: tinyrefiner" in refined.infotexts[0] and "Refiner switch at: 0.75" in refined.infotexts[0]
    assert not torch.allclose(refined.latents, base.latents, atol=1e-3)
    ref_steps = []
    pipe.set_refiner(pipe, 0.75)  # the base model as its own refiner: the split must change nothing
    same = pipe.img2img("a red circle", init, **kw)
    torch.testing.assert_close(same.latents, base.latents, atol=1e-5, rtol=0)
    pipe.set_refiner(ref, 0.25)
    only_refiner = pipe.img2img("a red circle", init, callback=lambda i, n, x, x0: ref_steps.append(i), **kw)
    assert ref_steps == [0, 1, 2, 3]
    assert not torch.allclose(only_refiner.latents, refined.latents, atol=1e-3)
    pipe.set_refiner(None)


def test_refiner_cli(tiny_xl, tiny_refiner, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(tiny_xl), "--outdir", str(out), "--H", "64", "--W", "64", "--ddim_steps", "4",
            "--n_samples", "1", "--n_iter", "1", "--no-watermark", "--precision", "full", "--prompt", "a red circle"]
    assert main(args + ["--refiner", str(tiny_refiner), "--refiner-switch", "0.75"]) == 0
    text = Image.open(out / "samples" / "00000.png").text["parameters"]
    assert "Refiner: tinyrefiner" in text and "Refiner switch at: 0.75" in text
    assert main(args + ["--refiner", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "init.png")
    img2img = ["img2img" if a == "txt2img" else a for a in args] + ["--init-img", str(tmp_path / "init.png")]
    assert main(img2img + ["--outdir", str(tmp_path / "i2i"), "--refiner", str(tiny_refiner)]) == 0
    text = Image.open(tmp_path / "i2i" / "samples" / "00000.png").text["parameters"]
    assert "Refiner: tinyrefiner" in text and "Denoising strength" in text


def test_kohya_sdxl_lora_reaches_both_text_encoders_and_the_fused_qkv(tiny_xl, tmp_path):
    pipe = pipe_for(tiny_xl)
    params = dict(pipe.model.named_parameters())
    modules = sdref.kohya_modules({k: v.shape for k, v in params.items()}, pipe.cfg)
    sd = sdref.random_kohya_lora(modules, rank=2, alpha=1.0)
    save_file(sd, str(tmp_path / "xl.safetensors"))
    lora = pipe.load_lora(tmp_path / "xl.safetensors")
    assert not lora.unmatched and len(lora.patches) == len(modules)
    before = {k: v.detach().clone() for k, v in params.items()}
    pipe.set_loras([(lora, 1.0, 1.0)])
    delta = lambda name: 0.5 * sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]  # alpha/rank = 0.5
    g = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    w = pipe.cfg.text2.width
    assert torch.allclose(params[g][w:2 * w], before[g][w:2 * w]
                          + delta("lora_te2_text_model_encoder_layers_1_self_attn_k_proj"), atol=1e-6)
    assert torch.allclose(params[g][:w],
                          before[g][:w] + delta("lora_te2_text_model_encoder_layers_1_self_attn_q_proj"), atol=1e-6)
    l1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(params[l1], before[l1] + delta("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
                          atol=1e-6)
    u = "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn1.to_q.weight"
    assert torch.allclose(params[u], before[u] + delta("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q"),
                          atol=1e-6)
    pipe.set_loras([])
    assert all(torch.equal(params[k], before[k]) for k in params)  # removal is exact


def test_img2img_and_inpainting_on_sdxl(tiny_xl):
    pipe = pipe_for(tiny_xl)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (32, 16, 64, 48))
    r = pipe.img2img("a red circle", init, steps=4, sampler="euler", strength=0.6, seed=1)
    assert r.images[0].size == (96, 64)
    inp = pipe.img2img("a red circle", init, mask=mask, mask_blur=0, steps=4, sampler="ddim", strength=1.0, seed=1)
    px, src = np.asarray(inp.images[0]), np.asarray(init)
    assert np.array_equal(px[:8], src[:8])  # outside the mask: the original pixels
    assert not np.array_equal(px[24:40, 40:56], src[24:40, 40:56])


def test_sdxl_through_the_a1111_api_with_weighted_prompts(tiny_xl):
    """The server on an SDXL file: txt2img and img2img answer images; emphasis reaches the conditioning."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from kiln.server import Limits, ServerConfig, create_app

    app = create_app(ServerConfig(ckpt=str(tiny_xl), outdir=None, save=False, limits=Limits(max_size=128)))
    try:
        client = TestClient(app)
        body = dict(prompt="a (red:1.4) circle", steps=3, width=64, height=64, sampler_name="Euler", seed=2)
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert img.size == (64, 64)
        plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red circle"}).json()["images"][0]
        assert plain != r.json()["images"][0]  # the weight changed the picture
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r2 = client.post("/sdapi/v1/img2img", json={**body, "init_images": [base64.b64encode(buf.getvalue()).decode()],
                                                     "denoising_strength": 0.5})
        assert r2.status_code == 200, r2.text
        models = client.get("/sdapi/v1/sd-models").json()
        assert "tinyxl" in [m["model_name"] for m in models]  # listed beside the embedded demo model
    finally:
        app.state.worker.stop()


def test_from_png_takes_the_refiner_switch(tiny_xl, tiny_refiner, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(tiny_xl), "--outdir", str(out), "--H", "64", "--W", "64", "--ddim_steps", "4",
            "--n_samples", "1", "--n_iter", "1", "--no-watermark", "--precision", "full", "--prompt", "a red circle"]
    assert main(args + ["--refiner", str(tiny_refiner), "--refiner-switch", "0.5"]) == 0
    first = np.asarray(Image.open(out / "samples" / "00000.png"))
    again = ["txt2img", "--ckpt", str(tiny_xl), "--outdir", str(out), "--no-watermark", "--precision", "full",
             "--from-png", str(out / "samples" / "00000.png")]
    assert main(again) == 0
    assert "pass --refiner FILE" in capsys.readouterr().err
    assert main(again + ["--refiner", str(tiny_refiner)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "00002.png")), first)  # switch 0.5 from the PNG


def test_refiner_through_the_a1111_api(tiny_xl, tiny_refiner, tmp_path):
    """`refiner_checkpoint` + `refiner_switch_at` (A1111 1.6+) in txt2img and img2img requests: the refiner runs
    for that request only; unknown or incompatible refiners answer 422."""
    import base64
    import io
    import shutil

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kiln.demo.report import EMBEDDED
    from kiln.server import ServerConfig, create_app

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_refiner, models / "tinyrefiner.safetensors")
    shutil.copy(EMBEDDED, models / "demo.safetensors")
    app = create_app(ServerConfig(ckpt=str(tiny_xl), ckpt_dir=str(models), precision="full"))
    try:
        client = TestClient(app)
        body = {"prompt": "a red circle", "steps": 4, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
        info = lambda r: (r.status_code, r.json()["info"] if r.status_code == 200 else r.json()["detail"])
        plain = client.post("/sdapi/v1/txt2img", json=body)
        refined = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "tinyrefiner",
                                                         "refiner_switch_at": 0.5})
        code, text = info(refined)
        assert code == 200 and "Refiner: tinyrefiner" in text and "Refiner switch at: 0.5" in text
        assert refined.json()["images"][0] != plain.json()["images"][0]
        again = client.post("/sdapi/v1/txt2img", json=body)  # the next request runs without it
        assert again.json()["images"][0] == plain.json()["images"][0] and "Refiner" not in info(again)[1]
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
        init = base64.b64encode(buf.getvalue()).decode()
        code, text = info(client.post("/sdapi/v1/img2img", json={**body, "init_images": [init],
                                                                  "refiner_checkpoint": "tinyrefiner"}))
        assert code == 200 and "Refiner switch at: 0.8" in text  # A1111's default switch
        code, text = info(client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nope"}))
        assert code == 422 and "refiner_checkpoint: unknown model 'nope'" in text
        code, text = info(client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "demo"}))
        assert code == 422 and "latent space" in text
    finally:
        app.state.worker.stop()
