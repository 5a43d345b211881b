"""The A1111 API's surface beyond generation: A1111's own API test folder's requests, unchanged; request
strictness (every field honoured, UI-only or refused by name); settings; prompt styles; extras (upscaling).

One in-process app on the embedded demo model (64x64), driven through FastAPI's test client; the requests that
generate use 2-3 steps.
"""
import base64
import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402
from kiln.server.fields import HONOURED, REFUSED, UI_ONLY  # noqa: E402
from kiln.server.schemas import Img2ImgRequest, Txt2ImgRequest  # noqa: E402

STYLES = ('name,prompt,negative_prompt\n'
          'Blue,"a large {prompt} in the center on a blue background",blurry\n'
          'Crisp,sharp,"lowres, noise"\n')


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    (root / "models").mkdir()
    shutil.copy(EMBEDDED, root / "models" / "other.safetensors")
    (root / "styles.csv").write_text(STYLES)
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), ckpt_dir=str(root / "models"), outdir=str(root / "out"),
                                  styles_file=str(root / "styles.csv"), limits=Limits(max_size=256),
                                  api_auth=[("ann", "pw")], port=7861))
    app.state.root = root
    yield app
    app.state.worker.stop()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, headers={"Authorization": "Basic " + base64.b64encode(b"ann:pw").decode()})


def b64(im: Image.Image, **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return base64.b64encode(buf.getvalue()).decode()


def image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def sizes(r) -> list:
    assert r.status_code == 200, r.text
    return [image(x).size for x in r.json()["images"]]


# ---------------------------------------------------------------------- A1111's test folder, unchanged
INIT = Image.new("RGB", (64, 64), (30, 60, 200))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))
TXT2IMG = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
           "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
           "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
           "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
           "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}
IMG2IMG = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
           "include_init_images": False, "init_images": [b64(INIT)], "inpaint_full_res": False,
           "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
           "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
           "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
           "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
           "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


@pytest.mark.parametrize("change, want", [
    ({}, [(64, 64)]),
    ({"negative_prompt": "example negative prompt"}, [(64, 64)]),
    ({"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"}, [(64, 64)]),
    ({"height": 128}, [(64, 128)]),
    ({"enable_hr": True}, [(128, 128)]),  # hr_scale's default, 2
    ({"tiling": True}, [(64, 64)]),
    ({"sampler_index": "PLMS"}, [(64, 64)]),
    ({"sampler_index": "DDIM"}, [(64, 64)]),
    ({"sampler_index": "UniPC"}, [(64, 64)]),
    ({"n_iter": 2}, [(64, 64)] * 2),
    ({"batch_size": 2}, [(64, 64)] * 2),
])
def test_a1111_txt2img_requests(client, change, want):
    assert sizes(client.post("/sdapi/v1/txt2img", json={**TXT2IMG, **change})) == want


def test_a1111_restore_faces_is_refused_by_name(client):
    """The one request of A1111's folder kiln cannot run as asked: no face-restorer model."""
    r = client.post("/sdapi/v1/txt2img", json={**TXT2IMG, "restore_faces": True})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("restore_faces: face restoration needs a face-restorer model, kiln has none")


@pytest.mark.parametrize("change", [{}, {"mask": b64(MASK)}, {"mask": b64(MASK), "inpainting_mask_invert": True}])
def test_a1111_img2img_requests(client, change):
    assert sizes(client.post("/sdapi/v1/img2img", json={**IMG2IMG, **change})) == [(64, 64)]


def test_a1111_utils_requests(client):
    pre = client.get("/sdapi/v1/options").json()["send_seed"]
    assert client.post("/sdapi/v1/options", json={"send_seed": not pre}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["send_seed"] == (not pre)
    assert client.post("/sdapi/v1/options", json={"send_seed": pre}).status_code == 200
    for url in ("cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks", "face-restorers",
                "realesrgan-models", "prompt-styles", "embeddings", "extensions"):
        assert client.get(f"/sdapi/v1/{url}").status_code == 200, url


@pytest.mark.parametrize("payload, size", [
    ({"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
      "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
      "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0},
     (128, 128)),
    ({}, (64, 64)),  # A1111's defaults: upscaler_1 "None", so the image comes back as it is
    ({"model": "clip"}, (64, 64)),  # an interrogate field A1111's test sends here; A1111 ignores it
])
def test_a1111_extras_requests(client, payload, size):
    r = client.post("/sdapi/v1/extra-single-image", json={**payload, "image": b64(INIT)})
    assert r.status_code == 200, r.text
    assert image(r.json()["image"]).size == size and "html_info" in r.json()


def test_get_surface_shapes(client):
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["ckpt"] == str(EMBEDDED) and flags["ckpt_dir"].endswith("models") and flags["port"] == 7861
    assert flags["api"] is True and flags["nowebui"] is False and flags["listen"] is False
    assert flags["api_auth"] == "***" and "pw" not in str(flags)  # credentials never shown
    for url in ("hypernetworks", "face-restorers", "realesrgan-models", "extensions"):
        assert client.get(f"/sdapi/v1/{url}").json() == []
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Blue", "prompt": "a large {prompt} in the center on a blue background", "negative_prompt": "blurry"},
        {"name": "Crisp", "prompt": "sharp", "negative_prompt": "lowres, noise"}]


# ---------------------------------------------------------------------- request strictness
@pytest.mark.parametrize("model, mode", [(Txt2ImgRequest, "txt2img"), (Img2ImgRequest, "img2img")])
def test_every_field_is_in_exactly_one_group(model, mode):
    groups = [set(HONOURED["both"]) | set(HONOURED[mode]), set(UI_ONLY), set(REFUSED)]
    fields = set(model.model_fields)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not a & b
    assert fields <= set().union(*groups), fields - set().union(*groups)
    assert set().union(*groups[:1]) <= fields
    other = "img2img" if mode == "txt2img" else "txt2img"
    assert not set(HONOURED[other]) & fields  # e.g. enable_hr is txt2img's only


def _bad_value(annotation):
    text = str(annotation)
    for kind, value in (("bool", True), ("float", 0.5), ("int", 3), ("list", ["x"]), ("dict", {"x": 1}),
                        ("str", "something else")):
        if kind in text:
            return value
    raise AssertionError(text)


@pytest.mark.parametrize("mode, model", [("txt2img", Txt2ImgRequest), ("img2img", Img2ImgRequest)])
def test_refused_fields_are_named_with_their_reason(client, mode, model):
    base = TXT2IMG if mode == "txt2img" else IMG2IMG
    checked = 0
    for name, rule in REFUSED.items():
        if name not in model.model_fields:
            continue
        body = {**base, name: _bad_value(model.model_fields[name].annotation)}
        r = client.post(f"/sdapi/v1/{mode}", json=body)
        assert r.status_code == 422, (name, r.text)
        assert f"{name}: {rule.why}" in r.json()["detail"], (name, r.json()["detail"])
        checked += 1
    assert checked == (8 + 7 if mode == "txt2img" else 8 + 3)  # shared, then the mode's own


def test_refused_fields_accept_their_no_op_values(client):
    body = {**TXT2IMG, "steps": 2, "enable_hr": True, "hr_scale": 1.5, "sampler_name": "Euler",
            "hr_sampler_name": "Euler", "hr_scheduler": "Use same scheduler", "hr_prompt": "example prompt",
            "hr_negative_prompt": "", "hr_checkpoint_name": "Use same checkpoint", "refiner_checkpoint": "None",
            "refiner_switch_at": 0.8, "script_name": "", "script_args": [], "alwayson_scripts": {},
            "disable_extra_networks": False, "infotext": "", "s_min_uncond": 0,
            # UI-only: any value
            "do_not_save_samples": True, "do_not_save_grid": True, "comments": {"a": 1}}
    assert sizes(client.post("/sdapi/v1/txt2img", json=body)) == [(96, 96)]
    body = {**IMG2IMG, "steps": 2, "image_cfg_scale": 1.5, "initial_noise_multiplier": 1.0, "mask_round": None}
    assert sizes(client.post("/sdapi/v1/img2img", json=body)) == [(64, 64)]


@pytest.mark.parametrize("mode, extra, words", [
    ("txt2img", {"cfg": 7, "prompts": "x"}, "unknown fields cfg, prompts: not part of A1111's txt2img request"),
    ("img2img", {"enable_hr": True}, "unknown field enable_hr: not part of A1111's img2img request"),
    ("txt2img", {"script_name": "x/y plot"}, "Script 'x/y plot' not found"),
    ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [False]}}}, "alwayson_scripts: 'ADetailer' is not"),
    ("txt2img", {"refiner_checkpoint": "nope.safetensors"}, "refiner_checkpoint: unknown model 'nope.safetensors'"),
    ("img2img", {"init_images": [b64(INIT), b64(INIT)]}, "init_images: kiln takes one init image"),
    ("txt2img", {"force_task_id": "no spaces please"}, "force_task_id must be"),
])
def test_bad_fields_are_refused_by_name(client, mode, extra, words):
    r = client.post(f"/sdapi/v1/{mode}", json={**(TXT2IMG if mode == "txt2img" else IMG2IMG), **extra})
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = client.post(f"/api/v1/{mode}", json={**(TXT2IMG if mode == "txt2img" else IMG2IMG), **extra})
    assert r.status_code == 422 and words in r.json()["detail"], r.text  # the job API takes the same bodies


def test_force_task_id_names_the_job(client):
    r = client.post("/api/v1/txt2img", json={**TXT2IMG, "steps": 2, "force_task_id": "task(abc123)"})
    assert r.status_code == 202 and r.json()["id"] == "task(abc123)"
    r = client.post("/api/v1/txt2img", json={**TXT2IMG, "steps": 2, "force_task_id": "task(abc123)"})
    assert r.status_code == 422 and "already a job's id" in r.json()["detail"]


# ---------------------------------------------------------------------- settings
def test_options_round_trip_and_refusals(client):
    before = client.get("/sdapi/v1/options").json()
    assert before["sd_model_checkpoint"].startswith("demo.safetensors [")
    assert client.post("/sdapi/v1/options", json=before).status_code == 200  # what GET says, POST takes back
    cases = [({"outdir_samples": "/tmp/x"}, "outdir_samples would set a server path"),
             ({"samples_filename_pattern": "[seed]", "send_seed": False}, "samples_filename_pattern would set"),
             ({"temp_dir": "/tmp"}, "temp_dir would set a server path"),
             ({"show_progressbar": True, "zzz": 1}, "unknown settings show_progressbar, zzz"),
             ({"jpeg_quality": 0}, "jpeg_quality must be an integer from 1 to 100"),
             ({"samples_format": "gif"}, "samples_format must be png, jpg or webp"),
             ({"return_grid": True}, "return_grid True is not supported"),
             ({"randn_source": "GPU"}, "randn_source 'GPU' is not supported"),
             ({"CLIP_stop_at_last_layers": 0}, "CLIP_stop_at_last_layers must be an integer from 1"),
             ({"sd_checkpoint_hash": "0" * 64}, "not a setting"),
             ({"send_seed": "yes"}, "send_seed must be true or false")]
    for body, words in cases:
        r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, **body})
        assert r.status_code == 422 and words in r.json()["detail"], (body, r.text)
    assert client.get("/sdapi/v1/options").json() == before  # a refused request changes nothing
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404


def _saved(app):
    return sorted((app.state.root / "out" / "samples").glob("*"))


def test_samples_format_and_quality_apply_to_saved_files(app, client):
    import piexif
    import piexif.helper

    body = {**TXT2IMG, "steps": 2, "seed": 5, "save_images": True}
    assert client.post("/sdapi/v1/options", json={"samples_format": "jpg", "jpeg_quality": 40}).status_code == 200
    try:
        r = client.post("/sdapi/v1/txt2img", json=body)
        path = _saved(app)[-1]
        assert path.suffix == ".jpg" and Image.open(path).format == "JPEG"
        exif = piexif.load(str(path))  # as A1111 reads the parameters of a JPEG
        comment = piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
        assert comment == json_info(r)["infotexts"][0]
        low = path.stat().st_size
        client.post("/sdapi/v1/options", json={"jpeg_quality": 95})
        client.post("/sdapi/v1/txt2img", json=body)
        assert _saved(app)[-1].stat().st_size > low  # the quality setting is what the encoder used
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"samples_format": "webp"}})
        assert _saved(app)[-1].suffix == ".webp"  # for this request only
        png = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(_saved(app)[-1].read_bytes())
                                                      .decode()}).json()
        assert png["info"] == json_info(r)["infotexts"][0]
        client.post("/sdapi/v1/options", json={"samples_save": False})
        n = len(_saved(app))
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
        assert len(_saved(app)) == n  # samples_save false: nothing saved, whatever the request says
    finally:
        client.post("/sdapi/v1/options", json={"samples_format": "png", "jpeg_quality": 80, "samples_save": True})
    client.post("/sdapi/v1/txt2img", json=body)
    assert _saved(app)[-1].suffix == ".png"


def json_info(r) -> dict:
    import json

    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_override_settings_for_one_request_or_kept(client):
    body = {**TXT2IMG, "steps": 2, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert "Clip skip: 2" in json_info(r)["infotexts"][0]
    assert "Clip skip" not in json_info(client.post("/sdapi/v1/txt2img", json=body))["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 2},
                                               "override_settings_restore_afterwards": False})
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2  # kept, as A1111
    assert "Clip skip: 2" in json_info(client.post("/sdapi/v1/txt2img", json=body))["infotexts"][0]
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"eta_noise_seed_delta": 31337}})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("eta_noise_seed_delta 31337 is not supported: kiln does not offset")


def test_a_model_override_is_for_its_request_only(client):
    body = {**TXT2IMG, "steps": 2, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "other"}})
    assert "Model: other" in json_info(r)["infotexts"][0]
    # the next request runs on the chosen model again, as in A1111 (override_settings_restore_afterwards)
    assert "Model: demo" in json_info(client.post("/sdapi/v1/txt2img", json=body))["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("demo.")


# ---------------------------------------------------------------------- styles
def test_styles_expand_the_prompts_and_the_infotext_records_them(client):
    body = {**TXT2IMG, "steps": 2, "seed": 9, "prompt": "red circle", "negative_prompt": "noise",
            "styles": ["Blue", "Crisp"]}
    r = client.post("/sdapi/v1/txt2img", json=body)
    info = json_info(r)
    expanded = "a large red circle in the center on a blue background, sharp"
    assert info["prompt"] == expanded and info["all_prompts"] == [expanded]
    assert info["negative_prompt"] == "noise, blurry, lowres, noise" and info["styles"] == ["Blue", "Crisp"]
    assert info["infotexts"][0].startswith(f"{expanded}\nNegative prompt: noise, blurry, lowres, noise\n")
    assert r.json()["parameters"]["prompt"] == "red circle"  # the request echoed as sent
    plain = client.post("/sdapi/v1/txt2img", json={**body, "styles": [], "prompt": expanded,
                                                   "negative_prompt": "noise, blurry, lowres, noise"})
    assert plain.json()["images"] == r.json()["images"]  # a style is exactly its text in the prompt
    # reading the infotext back (png-info) finds the styles and takes them out again, as A1111
    parsed = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()["parameters"]
    assert parsed["Styles array"] == ["Blue", "Crisp"]
    assert parsed["prompt"] == "red circle" and parsed["negative_prompt"] == "noise"
    r = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Blue", "Nope"]})
    assert r.status_code == 422 and "styles: unknown style 'Nope'; the styles are: 'Blue', 'Crisp'" in r.text


def test_webuiapi_txt2img_with_styles(app):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1", sampler="Euler a", steps=2)
    api.session = TestClient(app)
    api.set_auth("ann", "pw")
    r = api.txt2img(prompt="red circle", styles=["Crisp"], width=64, height=64, seed=2)
    assert r.info["infotexts"][0].startswith("red circle, sharp\nNegative prompt: lowres, noise\n")
    assert r.image.size == (64, 64)


# ---------------------------------------------------------------------- extras
def _extras(client, **kw):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(SOURCE), **kw})
    assert r.status_code == 200, r.text
    return image(r.json()["image"]), r.json()["html_info"]


SOURCE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("kw, size", [
    ({"upscaler_1": "Lanczos", "upscaling_resize": 2}, (96, 128)),
    ({"upscaler_1": "Nearest", "upscaling_resize": 1.3}, (56, 80)),  # A1111 rounds down to multiples of 8
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60}, (100, 60)),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60,
      "upscaling_crop": False}, (96, 128)),  # scale max(100/48, 60/64), no crop
    ({"upscaler_1": "None", "upscaling_resize": 4}, (48, 64)),
])
def test_extras_sizes(client, kw, size):
    out, html = _extras(client, **kw)
    assert out.size == size
    if kw["upscaler_1"] != "None":
        assert html.startswith("<p>Postprocess upscale") and f"Postprocess upscaler: {kw['upscaler_1']}" in html


def test_extras_pixels_and_blend(client):
    out, _ = _extras(client, upscaler_1="Nearest", upscaling_resize=2)
    assert np.array_equal(np.asarray(out), np.asarray(SOURCE.resize((96, 128), Image.NEAREST)))
    lanczos = np.asarray(SOURCE.resize((96, 128), Image.LANCZOS)).astype(int)
    out, html = _extras(client, upscaler_1="Nearest", upscaling_resize=2, upscaler_2="Lanczos",
                        extras_upscaler_2_visibility=0.5)
    assert np.abs(np.asarray(out).astype(int) - (np.asarray(SOURCE.resize((96, 128), Image.NEAREST)) + lanczos) / 2
                  ).max() <= 1 and "Postprocess upscaler 2: Lanczos" in html


def test_extras_keep_the_text_chunks_and_batch(client):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 2, Seed: 1, Size: 48x64")
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "upscaler_1": "Lanczos", "upscaling_resize": 2,
        "imageList": [{"data": b64(SOURCE, pnginfo=meta), "name": "a.png"}, {"data": b64(INIT), "name": "b.png"}]})
    assert r.status_code == 200, r.text
    first, second = (image(x) for x in r.json()["images"])
    assert first.size == (96, 128) and second.size == (128, 128)
    assert first.info["parameters"].startswith("a cat") and "upscaler: Lanczos" in first.info["postprocessing"]


@pytest.mark.parametrize("kw, words", [
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility: face restoration needs face-restoration weights"),
    ({"codeformer_visibility": 1}, "codeformer_visibility: face restoration"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler 'R-ESRGAN 4x+' is not available; choose one of None, Lanczos"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0.05}, "outside 8 pixels"),
    ({"upscale": 2}, "unknown field upscale"),
    ({"image": ""}, "image: empty"),
])
def test_extras_refusals(client, kw, words):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(SOURCE), **kw})
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_docs_list_every_ui_only_and_refused_field_and_every_setting():
    from pathlib import Path

    from kiln.server.options import OPTIONS

    text = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    missing = [n for n in [*UI_ONLY, *REFUSED, *OPTIONS] if f"`{n}`" not in text]
    assert not missing, f"docs/server.md does not mention {missing}"
