"""Model upscalers where A1111 uses them: `kiln upscale`, hires fix (`hires_upscaler`, `hr_upscaler`), the SD upscale
script, and the API (/sdapi/v1/upscalers, /realesrgan-models, extra-single-image / extra-batch-images). The upscaler
files are small random-weight ESRGANs (test_upscale.write_esrgan); the model is the embedded demo (64x64)."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from kiln.cli import main
from test_upscale import picture, write_esrgan

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    (root / "ups").mkdir()
    write_esrgan(root / "ups" / "4x-Tiny.safetensors")
    write_esrgan(root / "ups" / "RealESRGAN_x4plus.pth", seed=3)
    (root / "bad").mkdir()
    (root / "bad" / "broken.pth").write_bytes(b"PK\x03\x04 truncated")
    return root


@pytest.fixture(scope="module")
def client(files):
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), outdir=None, save=False, upscaler_dir=str(files / "ups"),
                                  device="cpu", limits=Limits(max_size=256, max_image_pixels=300 * 300)))
    yield TestClient(app)
    app.state.worker.stop()


def b64(im: Image.Image, **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return base64.b64encode(buf.getvalue()).decode()


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


SOURCE = Image.fromarray(picture(64, 64))


# ------------------------------------------------------------------------------------------------------ API
def test_upscalers_lists_the_models(client, files):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "4x-Tiny", "R-ESRGAN 4x+"]
    path = str(files / "ups" / "4x-Tiny.safetensors")
    assert listed[3] == {"name": "4x-Tiny", "model_name": "ESRGAN", "model_path": path, "model_url": None, "scale": 4}
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["esrgan_models_path"] == str(files / "ups") and flags["dat_models_path"] is None
    assert client.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN 4x+", "path": str(files / "ups" / "RealESRGAN_x4plus.pth"), "scale": 4}]


def test_extras_with_a_model_and_a_blend(client):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 2, Seed: 1, Size: 64x64")
    r = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64(SOURCE, pnginfo=meta), "upscaler_1": "4x-tiny", "upscaling_resize": 2,
        "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.3})
    assert r.status_code == 200, r.text
    out = decoded(r.json()["image"])
    assert out.size == (128, 128) and out.info["parameters"].startswith("a cat")
    assert out.info["postprocessing"] == ("Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny, "
                                          "Postprocess upscaler 2: Lanczos")
    lanczos = np.asarray(SOURCE.resize((128, 128), Image.LANCZOS)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - lanczos).mean() > 2  # the model's picture is in it
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64(SOURCE), "name": "a.png"}], "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4})
    assert r.status_code == 200 and decoded(r.json()["images"][0]).size == (256, 256)


@pytest.mark.parametrize("body, words", [
    ({"upscaler_1": "nope"}, "upscaler_1: upscaler 'nope' is not available; choose one of None, Lanczos, Nearest, "
                             "4x-Tiny, R-ESRGAN 4x+"),
    ({"upscaler_1": "4x-Tiny", "upscaling_resize": 8}, "the upscaled size 512x512 is outside 8 pixels to the limit "
                                                       "of 90,000 pixels"),
    ({"upscaler_1": "/etc/passwd.pth"}, "is not available"),  # never a path on the server's disk
])
def test_extras_refusals(client, body, words):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(SOURCE), **body})
    assert r.status_code == 422 and words in r.json()["detail"] and "\n" not in r.json()["detail"], r.text


def test_hr_upscaler_by_model_name(client):
    body = {"prompt": PROMPT, "steps": 2, "seed": 3, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2,
            "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    latent = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Latent"})
    model = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-Tiny"})
    assert latent.status_code == model.status_code == 200, model.text
    a, b = (np.asarray(decoded(r.json()["images"][0])).astype(int) for r in (latent, model))
    assert a.shape == b.shape == (128, 128, 3) and np.abs(a - b).mean() > 1
    assert "Hires upscaler: 4x-Tiny" in model.json()["info"]
    r = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 8x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("hr_upscaler: upscaler 'R-ESRGAN 8x' is not")


# ------------------------------------------------------------------------------------------------ pipeline
def test_hires_with_a_model_file_differs_from_latent(pipe, files):
    path = str(files / "ups" / "4x-Tiny.safetensors")
    kw = dict(steps=2, seed=3, hires_scale=2, hires_steps=2, hires_strength=0.5)
    latent = pipe.txt2img(PROMPT, **kw)
    model = pipe.txt2img(PROMPT, hires_upscaler=path, **kw)
    assert np.abs(latent.pixels.astype(int) - model.pixels.astype(int)).mean() > 1
    assert f"Hires upscaler: {path}" in model.infotexts[0]
    with pytest.raises(Exception, match="broken.pth"):
        pipe.txt2img(PROMPT, hires_upscaler=str(files / "bad" / "broken.pth"), **kw)


def test_sd_upscale_with_a_model(pipe, files):
    from kiln import scripts
    from kiln.pipeline import GenerationParams
    from kiln.pipeline.upscalers import Upscalers

    ups = Upscalers(files / "ups", device="cpu")
    base = GenerationParams.make(prompt=[PROMPT], init_image=SOURCE, steps=2, width=64, height=64, strength=0.3)
    env = scripts.Env("img2img", 64, 8, upscalers=ups)
    plan = scripts.prepare("sd upscale", ["", 16, "4x-Tiny", 2], base, env)
    assert plan.data["upscaler"] == "4x-Tiny" and plan.data["tiles"].width == 128
    by_index = scripts.prepare("sd upscale", ["", 16, 3, 2], base, env)  # /sdapi/v1/upscalers' order
    assert by_index.data["upscaler"] == "4x-Tiny"


def test_xyz_hires_upscaler_axis_takes_models(files):
    from kiln import scripts
    from kiln.pipeline import GenerationParams
    from kiln.pipeline.upscalers import Upscalers
    from test_scripts import xyz_args

    env = scripts.Env("txt2img", 64, 8, upscalers=Upscalers(files / "ups", device="cpu"), upscaler_files=False)
    base = GenerationParams.make(prompt=PROMPT, steps=2, width=64, height=64, hires_scale=2.0)
    plan = scripts.prepare("x/y/z plot", xyz_args(x=("Hires upscaler", "latent (bicubic), 4x-tiny, R-ESRGAN 4x+")),
                           base, env)
    assert [r.params.hires_upscaler for r in plan.runs] == ["latent", "4x-Tiny", "R-ESRGAN 4x+"]
    with pytest.raises(Exception, match=r"X values \(Hires upscaler\): upscaler .nope. is not available"):
        scripts.prepare("x/y/z plot", xyz_args(x=("Hires upscaler", "Latent, nope")), base, env)


# ----------------------------------------------------------------------------------------------------- CLI
def huge_png(path, w=9000, h=8000):
    """A PNG whose header claims w x h (its pixels are never decoded: the size is refused first)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_kiln_upscale_writes_stem_png_with_the_parameters(tmp_path, files, capsys):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 2, Seed: 1, Size: 64x64")
    SOURCE.save(tmp_path / "cat.png", pnginfo=meta)
    Image.fromarray(picture(40, 32)).save(tmp_path / "dog.jpg")
    out = tmp_path / "out"
    rc = main(["upscale", str(tmp_path / "cat.png"), str(tmp_path / "dog.jpg"), "--model", "4x-Tiny", "--upscaler-dir",
               str(files / "ups"), "--tile", "32", "--overlap", "8", "--outdir", str(out), "--device", "cpu",
               "--model2", "Lanczos", "--visibility2", "0.25"])
    assert rc == 0
    cat, dog = Image.open(out / "cat.png"), Image.open(out / "dog.png")
    assert cat.size == (256, 256) and dog.size == (160, 128)  # the model's own scale
    assert cat.info["parameters"].startswith("a cat")
    text = "Postprocess upscale by: 4.0, Postprocess upscaler: 4x-Tiny, Postprocess upscaler 2: Lanczos"
    assert cat.info["postprocessing"] == cat.info["extras"] == text
    rc = main(["upscale", str(tmp_path / "cat.png"), "--model", "Nearest", "--scale", "2", "--outdir", str(out)])
    assert rc == 0 and np.array_equal(np.asarray(Image.open(out / "cat.png")),
                                      np.asarray(SOURCE.resize((128, 128), Image.NEAREST)))


@pytest.mark.parametrize("make, words", [
    (lambda d, f: ["--model", str(f / "bad" / "broken.pth")], "broken.pth"),
    (lambda d, f: ["--model", "nope"], "upscaler 'nope' is not available"),
    (lambda d, f: [str(huge_png(d / "huge.png")), "--model", "Lanczos"], "is too large"),
    (lambda d, f: [str(d / "missing.png"), "--model", "Lanczos"], "no such file"),
    (lambda d, f: ["--model", "Lanczos", "--scale", "300"], "--scale must be"),
    (lambda d, f: [str(d / "sub" / "ok.png"), "--model", "Lanczos"], "would both be written as ok.png"),
])
def test_kiln_upscale_refusals_write_nothing(tmp_path, files, capsys, make, words):
    SOURCE.save(tmp_path / "ok.png")
    (tmp_path / "sub").mkdir()
    SOURCE.save(tmp_path / "sub" / "ok.png")
    out = tmp_path / "out"
    rc = main(["upscale", str(tmp_path / "ok.png"), *make(tmp_path, files), "--outdir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and words in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())
