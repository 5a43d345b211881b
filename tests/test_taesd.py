"""TAESD: the loader's layouts against diffusers' AutoencoderTiny, its refusals, and the decoder in generation
(`decoder`, the preview decoder, the CLI, the server's sd_vae_decode_method) on a tiny random SD model with
an 8x VAE (TAESD's factor)."""
import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdref
import taesdref
from kiln.checkpoints.taesd import family_from_name, load_taesd
from kiln.errors import KilnError
from kiln.pipeline.vae import to_uint8

GEN = dict(steps=2, width=64, height=64, seed=3, watermark=False, sampler="euler")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-approx")
    dec, enc = taesdref.random_part("decoder"), taesdref.random_part("encoder", seed=1)
    paths = taesdref.write_layouts(root / "layouts", dec, encoder=enc)
    torch.save(enc, root / "taesd_encoder.pth")
    save_file(dec, str(root / "taesd_decoder.safetensors"))  # the folder as A1111 keeps it
    save_file(taesdref.random_part("decoder", seed=2), str(root / "taesdxl_decoder.safetensors"))
    return dict(dec=dec, enc=enc, root=root, **paths)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A random tiny SD 1.x whose VAE downsamples 8x (the demo model's and `tiny`'s: 4x, which TAESD does not
    fit), loaded."""
    import json

    import kiln
    from kiln.models import VAEConfig

    cfg = dataclasses.replace(sdref.tiny_config(), vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    state = sdref.random_state(cfg, seed=5)
    sdref.calibrate(state, cfg)
    path = tmp_path_factory.mktemp("tiny8") / "tiny8.safetensors"
    save_file(state, str(path), metadata={"kiln_config": json.dumps(cfg.to_dict())})
    return path, kiln.load(path, device="cpu")


# ------------------------------------------------------------------ the loader
@pytest.mark.parametrize("layout", ["pth", "safetensors", "diffusers"])
def test_layouts_decode_as_diffusers(files, layout):
    tiny = load_taesd(files[layout])
    ref = taesdref.diffusers_tiny(files["dec"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = tiny.module(z) * 2 - 1, ref.decode(z).sample
    assert theirs.std() > 0.3  # pixels at unit scale: a wrong tensor shows
    assert (ours - theirs).abs().max() <= 1e-5
    assert tiny.family == "sd" and tiny.latent_channels == 4 and (tiny.scale, tiny.shift) == (1.0, 0.0)


@pytest.mark.parametrize("source", ["taesd_encoder.pth", "layouts/taesd"])
def test_encoder_as_diffusers(files, source):
    tiny = load_taesd(files["root"] / source, "encoder")
    ref = taesdref.diffusers_tiny(files["dec"], files["enc"])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours, theirs = tiny.module((x + 1) / 2), ref.encode(x).latents
    assert theirs.std() > 0.3 and (ours - theirs).abs().max() <= 1e-5


def _bad_files(files, tmp_path):
    missing = dict(files["dec"])
    del missing["3.conv.0.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "bilinear").mkdir()
    (tmp_path / "bilinear" / "config.json").write_text('{"_class_name": "AutoencoderTiny", "upsample_fn": "bilinear"}')
    return [(files["root"] / "taesd_encoder.pth", "holds a TAESD encoder, not a decoder"),
            (tmp_path / "missing.safetensors", "lacks 3.conv.0.weight"),
            (tmp_path / "other.safetensors", "not a TAESD file"),
            (tmp_path / "kl", "describes a AutoencoderKL, not an AutoencoderTiny"),
            (tmp_path / "bilinear", "upsample_fn differ from TAESD's"),
            (tmp_path / "nothing.pth", "no such file or folder")]


def test_loader_refusals_are_one_line(files, tmp_path):
    for path, words in _bad_files(files, tmp_path):
        with pytest.raises(KilnError) as e:
            load_taesd(path)
        assert words in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_family_from_names():
    names = {"taesd_decoder.pth": "sd", "TAESDXL_decoder.safetensors": "sdxl", "taesd3_decoder.pth": "sd3",
             "taef1_decoder.pth": "flux", "madebyollin/taesdxl": "sdxl", "my_decoder.pth": None}
    assert {n: family_from_name(n) for n in names} == names


# ------------------------------------------------------------------ generation
def test_txt2img_with_decoder(tiny8, files):
    path, pipe = tiny8
    plain = pipe.txt2img("a cube", **GEN)
    r = pipe.txt2img("a cube", decoder=str(files["pth"]), **GEN)
    assert torch.equal(r.latents, plain.latents)  # the same sampling, another decoder
    tiny = load_taesd(files["pth"])
    with torch.no_grad():
        expected = to_uint8(tiny.module(r.latents) * 2 - 1)
    assert np.array_equal(r.pixels, expected)
    assert (r.pixels != plain.pixels).mean() > 0.5
    assert "VAE Decoder: TAESD" in r.infotexts[0] and "VAE Decoder" not in plain.infotexts[0]
    assert r.params["decoder"] == "taesd_decoder"


def test_decoder_of_another_latent_space_is_refused(tiny8, files, tmp_path):
    _, pipe = tiny8
    save_file(taesdref.random_part("decoder", latent_channels=16), str(tmp_path / "taef1_decoder.safetensors"))
    for name, words in (("taesdxl_decoder.safetensors", "made for SDXL (TAESDXL) latents, not this sd1 model's"),
                        ("taef1_decoder.safetensors", "decodes 16-channel latents of FLUX (TAEF1)")):
        folder = files["root"] if name.startswith("taesdxl") else tmp_path
        with pytest.raises(KilnError, match=r"\(") as e:
            pipe.txt2img("a cube", decoder=str(folder / name), **GEN)
        assert words in str(e.value), str(e.value)


def test_decoder_taesd_is_the_vae_approx_file(tiny8, files, tmp_path):
    _, pipe = tiny8
    try:
        pipe.vae_approx_dir = str(files["root"])
        by_name = pipe.txt2img("a cube", decoder="TAESD", **GEN)
        by_file = pipe.txt2img("a cube", decoder=str(files["safetensors"]), **GEN)
        assert np.array_equal(by_name.pixels, by_file.pixels)
        pipe.vae_approx_dir = str(tmp_path)
        with pytest.raises(KilnError, match="no taesd_decoder.safetensors or .pth in"):
            pipe.txt2img("a cube", decoder="TAESD", **GEN)
    finally:
        pipe.vae_approx_dir = None


def test_previews_come_from_the_preview_decoder(tiny8, files):
    _, pipe = tiny8
    seen, x0s = [], []
    pipe.set_preview_decoder(str(files["diffusers"]))
    try:
        pipe.txt2img("a cube", preview_every=1, on_preview=lambda i, n, images, seeds: seen.append(images[0]),
                     callback=lambda i, n, x, x0: x0s.append(x0.clone()), **GEN)
    finally:
        pipe.set_preview_decoder(None)
    assert len(seen) == GEN["steps"] and seen[0].size == (64, 64)  # full size (the latent approximation: 8x8)
    with torch.no_grad():
        expected = to_uint8(load_taesd(files["pth"]).module(x0s[-1]) * 2 - 1)[0]
    assert np.array_equal(np.asarray(seen[-1]), expected)


def test_infotext_reads_back():
    from kiln.pipeline.infotext import params_from_infotext, parse_infotext

    text = "a cube\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, VAE Decoder: TAESD"
    assert params_from_infotext(parse_infotext(text))["decoder"] == "TAESD"
    assert "decoder" not in params_from_infotext(parse_infotext(text.replace("TAESD", "Full")))


# ------------------------------------------------------------------ front ends
def test_cli_decoder_and_intermediates(tiny8, files, tmp_path, capsys):
    from kiln.cli import main

    path, pipe = tiny8
    out = tmp_path / "out"
    args = ["txt2img", "--ckpt", str(path), "--prompt", "a cube", "--H", "64", "--W", "64", "--ddim_steps", "2",
            "--sampler", "euler", "--seed", "3", "--n_samples", "1", "--n_iter", "1", "--no-watermark",
            "--outdir", str(out), "--skip_grid"]
    assert main([*args, "--decoder", str(files["safetensors"]), "--save-intermediates", "1",
                 "--preview-decoder", str(files["pth"])]) == 0
    ours = np.asarray(Image.open(out / "samples" / "00000.png"))
    assert np.array_equal(ours, pipe.txt2img("a cube", decoder=str(files["pth"]), **GEN).pixels[0])
    assert Image.open(out / "intermediates" / "seed3-step002.png").size == (64, 64)
    capsys.readouterr()
    assert main([*args, "--decoder", str(tmp_path / "nope.pth")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kiln: error: --decoder {tmp_path / 'nope.pth'}: no such file or folder"]


def test_server_sd_vae_decode_method(tiny8, files):
    from fastapi.testclient import TestClient

    from kiln.server import ServerConfig, create_app
    from kiln.server.context import RequestError
    from kiln.server.options import Context, validate

    path, pipe = tiny8
    app = create_app(ServerConfig(ckpt=str(path), outdir=None, save=False, vae_approx_dir=str(files["root"])))
    worker = app.state.worker
    try:
        assert worker.facts.taesd and worker.pipe.preview_decoder is not None  # found in the folder: previews use it
        body = dict(prompt="a cube", steps=2, width=64, height=64, seed=3, sampler_name="Euler", cfg_scale=7.5,
                    override_settings={"sd_vae_decode_method": "TAESD"})
        res = TestClient(app).post("/sdapi/v1/txt2img", json=body)
        assert res.status_code == 200, res.text
        import base64
        import io
        import json

        info = json.loads(res.json()["info"])
        assert "VAE Decoder: TAESD" in info["infotexts"][0]
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.json()["images"][0]))).convert("RGB"))
        want = pipe.txt2img("a cube", decoder=str(files["pth"]), **dict(GEN, cfg_scale=7.5)).pixels[0]
        assert np.array_equal(got, want)
        bad = TestClient(app).post("/sdapi/v1/txt2img", json=dict(body, override_settings={
            "sd_vae_decode_method": "Tiny"}))
        assert bad.status_code == 422 and "sd_vae_decode_method must be Full or TAESD" in bad.text
    finally:
        worker.stop()
    without = dataclasses.replace(worker.facts, taesd=False)
    with pytest.raises(RequestError, match="the server has no TAESD decoder for this model"):
        validate({"sd_vae_decode_method": "TAESD"}, Context(without))


def test_preview_share_skips_previews_that_cost_too_much(tiny8):
    _, pipe = tiny8

    def slow(i, n, images, seeds):
        made.append(i)
        time.sleep(0.2)  # far more than 1 % of these steps

    for share, expected in ((0.01, [0]), (0.0, [0, 1, 2, 3])):  # 0.01: the next after 20 s of sampling
        made = []
        pipe.txt2img("a cube", preview_every=1, on_preview=slow, preview_share=share, **dict(GEN, steps=4))
        assert made == expected, share


def test_server_refuses_a_preview_decoder_that_does_not_fit(tiny8, files):
    from kiln.server import ServerConfig, create_app

    path, _ = tiny8
    with pytest.raises(KilnError, match="preview decoder .*made for SDXL"):
        create_app(ServerConfig(ckpt=str(path), outdir=None, save=False,
                                preview_decoder=str(files["root"] / "taesdxl_decoder.safetensors")))
