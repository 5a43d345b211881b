"""ControlNet through the server, as sd-webui-controlnet defines its API: units in `alwayson_scripts` (webuiapi's
ControlNetUnit unchanged, the job API), the index of ControlNet files, the /controlnet endpoints. The demo model
with random ControlNets written in lllyasviel's layout; 64x64, 4 steps."""
import base64
import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from kiln.checkpoints.hashes import legacy_hash  # noqa: E402
from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402

from test_controlnet import write_controlnet  # noqa: E402

BASE = {"prompt": "a red circle on a white background", "steps": 4, "width": 64, "height": 64, "seed": 3,
        "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def app(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("cnapi")
    (root / "cn" / "sub").mkdir(parents=True)
    write_controlnet(root / "cn" / "edges.safetensors", pipe.cfg.unet, seed=0)
    write_controlnet(root / "cn" / "sub" / "other.pth", pipe.cfg.unet, seed=1)
    (root / "cn" / "notes.txt").write_text("not a model")
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), outdir=None, save=False, controlnet_dir=str(root / "cn"),
                                  limits=Limits(max_size=256)))
    app.state.root = root
    yield app
    app.state.worker.stop()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def square():
    im = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(im).rectangle([10, 10, 40, 40], outline="white", width=2)
    return im


def b64(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")).astype(int)


def unit(square, **kw):
    return {"enabled": True, "image": b64(square), "module": "none", "model": "edges", **kw}


def cn(*units):
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


def title(app, name):
    from kiln.demo.control_report import EMBEDDED_CONTROLNET

    path = EMBEDDED_CONTROLNET if name == "demo_controlnet" else next((app.state.root / 'cn').rglob(name + '.*'))
    return f"{name} [{legacy_hash(path)}]"


@pytest.fixture(scope="module")
def plain(client):
    return pixels(client.post("/sdapi/v1/txt2img", json=BASE))


def test_webuiapi_controlnet_unit_steers_the_image(app, square, plain):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1", sampler="Euler", steps=4)
    api.session = TestClient(app)
    assert api.controlnet_version() == 2
    # the folder's files, then the embedded demo ControlNet (listed when the embedded demo model is served)
    assert api.controlnet_model_list() == ["None", title(app, "edges"), title(app, "other"),
                                           title(app, "demo_controlnet")]
    u = webuiapi.ControlNetUnit(image=square, model=title(app, "edges"), weight=2.0)  # webuiapi's defaults else
    # alwayson_scripts given: webuiapi's default {} is one shared dict its txt2img writes the units into, so every
    # later call in this process (other test modules' too) would carry them
    r = api.txt2img(prompt=BASE["prompt"], width=64, height=64, seed=3, controlnet_units=[u], alwayson_scripts={})
    got = np.asarray(r.image.convert("RGB")).astype(int)
    assert np.abs(got - plain).max() > 20  # the unit changed the picture
    text = r.info["infotexts"][0]
    assert f'ControlNet 0: "Module: none, Model: {title(app, "edges")}, Weight: 2, Resize Mode: Resize and Fill' \
           in text
    assert r.info["extra_generation_params"]["ControlNet 0"].startswith("Module: none, Model: edges [")


def test_a_disabled_unit_changes_nothing_and_names_resolve(client, square, plain):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **cn(unit(square, enabled=False, model="nope"))})
    assert np.array_equal(pixels(r), plain)
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **cn({**unit(square), "model": "edges"})})
    by_name = pixels(r)
    for name in ("edges.safetensors", "EDGES [00000000]"):  # file name; name with another hash, as it does
        r = client.post("/sdapi/v1/txt2img", json={**BASE, **cn({**unit(square), "model": name})})
        assert np.array_equal(pixels(r), by_name), name
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **cn(unit(square, model="other", guidance_end=0.5,
                                                                 control_mode=2, resize_mode=0))})
    assert not np.array_equal(pixels(r), by_name)


@pytest.mark.parametrize("change, message", [
    ({"model": "missing-net"}, "args[0].model: unknown ControlNet model 'missing-net'"),
    ({"model": "None"}, "an enabled unit needs a ControlNet model"),
    ({"module": "openpose"}, "runs a network whose weights kiln does not have"),
    ({"colour": 1}, "args[0]: unknown field colour: not part of sd-webui-controlnet's unit"),
    ({"image": ""}, "no control image (image or input_image); txt2img has no init image"),
    ({"mask": "x"}, "args[0].mask: not valid base64"),
    ({"advanced_weighting": [1.0] * 13}, "per-layer weights are not supported"),
    ({"save_detected_map": True}, "kiln does not add the detected maps"),
    ({"guidance_start": 0.6, "guidance_end": 0.4}, "guidance start and end"),
    ({"control_mode": "loud"}, "control mode must be one of"),
    ({"module": "canny", "threshold_a": 300}, "threshold_a: Low Threshold of canny must be in 0..256"),
    ({"processor_res": 10}, "processor_res: expected a whole number of pixels"),
    ({"weight": "heavy"}, "weight: expected a number"),
    ({"input_image": "abc"}, "both 'input_image' and 'image' given"),
])
def test_bad_units_answer_422_naming_the_field(client, square, change, message):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **cn({**unit(square), **change})})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_other_always_on_scripts_and_shapes_are_refused(client, square):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"ADetailer": {"args": []}}})
    assert r.status_code == 422 and "'ADetailer' is not available" in r.text
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"ControlNet": [unit(square)]}})
    assert r.status_code == 422 and 'expected {"args": [unit, ...]}, got a list' in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": {"ControlNet": {"args": []}}})
    assert r.status_code == 200  # what webuiapi sends when the server has ControlNet and no unit is given


def test_img2img_takes_the_init_image_without_a_unit_image(client, square):
    body = {**BASE, "init_images": [b64(square)], "denoising_strength": 0.6}
    fallback = pixels(client.post("/sdapi/v1/img2img", json={**body, **cn(unit(square, image=""))}))
    given = pixels(client.post("/sdapi/v1/img2img", json={**body, **cn(unit(square))}))
    assert np.array_equal(fallback, given)
    none = pixels(client.post("/sdapi/v1/img2img", json=body))
    assert not np.array_equal(fallback, none)
    # webuiapi's {"image", "mask"} object, and [image, mask]
    wrapped = pixels(client.post("/sdapi/v1/img2img", json={**body, **cn(
        unit(square, image={"image": b64(square), "mask": None}))}))
    assert np.array_equal(wrapped, given)
    listed = pixels(client.post("/sdapi/v1/img2img", json={**body, **cn(unit(square, image=[b64(square), None]))}))
    assert np.array_equal(listed, given)
    # an inpaint unit with its own mask: ControlNet 1.1's masked input (masked pixels -1) changes the picture
    half = Image.new("L", square.size, 0)
    half.paste(255, (0, 0, square.size[0] // 2, square.size[1]))
    masked = pixels(client.post("/sdapi/v1/img2img", json={**body, **cn(
        unit(square, module="inpaint", image={"image": b64(square), "mask": b64(half)}))}))
    assert not np.array_equal(masked, given)


def test_the_job_api_takes_the_same_units(client, square, plain):
    legacy = {k: v for k, v in unit(square, weight=1.5).items() if k != "image"}
    r = client.post("/api/v1/txt2img", json={**BASE, **cn({**legacy, "input_image": b64(square)})})
    assert r.status_code == 202, r.text
    job = r.json()
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job['id']}").json()
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job["state"] == "done", job
    assert job["params"]["controlnets"] == [{
        "model": "edges", "module": "none", "weight": 1.5, "guidance_start": 0.0, "guidance_end": 1.0,
        "resize_mode": "Crop and Resize", "processor_res": 512, "threshold_a": None, "threshold_b": None,
        "control_mode": "Balanced"}]
    assert "ControlNet 0: " in job["infotexts"][0]
    im = np.asarray(Image.open(io.BytesIO(client.get(job["image_urls"][0]).content)).convert("RGB")).astype(int)
    assert np.abs(im - plain).max() > 10


def test_endpoints(client, app, square):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 8}
    assert client.get("/controlnet/model_list").json() == {
        "model_list": ["None", title(app, "edges"), title(app, "other"), title(app, "demo_controlnet")]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][0] == "none" and "canny" in modules["module_list"]
    assert modules["module_detail"]["canny"]["sliders"][1]["name"] == "Low Threshold"
    aliased = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "invert (from white bg & black line)" in aliased["module_list"]
    r = client.post("/controlnet/detect",
                    json={"controlnet_module": "invert", "controlnet_input_images": [b64(square)]})
    assert r.status_code == 200 and r.json()["info"] == "Success"
    inverted = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert np.array_equal(np.asarray(inverted.convert("RGB")), 255 - np.asarray(square))
    edges = client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_images": ["data:image/png;base64," + b64(square)],  # webuiapi's
        "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}).json()
    e = np.asarray(Image.open(io.BytesIO(base64.b64decode(edges["images"][0]))).convert("L"))
    assert e.shape == (64, 64) and set(np.unique(e)) == {0, 255}
    for body, message in (({"controlnet_module": "depth", "controlnet_input_images": [b64(square)]}, "weights"),
                          ({"controlnet_module": "canny"}, "no image given"),
                          ({"controlnet_input_images": [b64(square)], "colour": 1}, "unknown field colour")):
        r = client.post("/controlnet/detect", json=body)
        assert r.status_code == 422 and message in r.text, r.text
    info = json.loads(client.get("/sdapi/v1/cmd-flags").text)
    assert info["controlnet_dir"].endswith("cn")
