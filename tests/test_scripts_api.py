"""A1111's scripts through `/sdapi/v1` as its clients send them: webuiapi's `script_name`/`script_args`, A1111's own
SD upscale test request, the checkpoint axis switching models, /scripts and /script-info, and the 422s."""
import base64
import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402

from serving import running  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copy(EMBEDDED, models / "other.safetensors")
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), ckpt_dir=str(models), outdir=str(tmp_path_factory.mktemp("o")),
                                  limits=Limits(max_size=256, queue_size=4, max_n_iter=8, max_batch_size=2)))
    with running(app) as (url, port):
        yield app, url + "/sdapi/v1", port


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server[2], sampler="Euler", steps=2)


def b64(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image(data):
    return Image.open(io.BytesIO(base64.b64decode(data)))


def xyz(x_type, x_values, y_type=0, y_values="", lone=True):
    # A1111 1.10: 3 x (type, values, dropdown), legend, lone images, sub grids, keep -1, vary x/y/z, margin, csv
    return [x_type, x_values, [], y_type, y_values, [], 0, "", [], True, lone, False, False, False, False, False, 0,
            False]


def test_webuiapi_xyz_plot_answers_the_labelled_grid_first(server, api):
    app = server[0]
    r = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, steps=2, cfg_scale=5, script_name="X/Y/Z plot",
                    script_args=xyz(4, "2,3", 6, "4,6"))
    assert len(r.images) == 5 and r.info["index_of_first_image"] == 1
    grid = r.images[0]
    assert grid.size[0] > 128 and grid.size[1] > 128 and "Script: X/Y/Z plot" in grid.info["parameters"]
    pipe = app.state.worker.pipe
    want = pipe.txt2img(PROMPT, steps=3, cfg_scale=6, sampler="euler", width=64, height=64, seed=3)
    assert np.array_equal(np.asarray(r.images[4].convert("RGB")), want.pixels[0])
    assert "Steps: 3," in r.info["infotexts"][4] and "CFG scale: 6," in r.info["infotexts"][4]


def test_checkpoint_axis_switches_models_and_puts_the_first_back(server, api):
    app = server[0]
    names = [m["title"] for m in api.get_sd_models()]
    other = next(t for t in names if t.startswith("other."))
    first = next(t for t in names if t.startswith("demo."))
    r = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, steps=2, script_name="x/y/z plot",
                    script_args=xyz("Checkpoint name", f"{first},{other}", lone=True))
    assert "Model: demo" in r.info["infotexts"][1] and "Model: other" in r.info["infotexts"][2]
    assert app.state.worker.model_title == first


def test_a1111_sd_upscale_request_doubles_the_picture(server):
    # A1111's test_img2img_sd_upscale_performed, with its simple request at 64 px
    body = {"init_images": [b64(Image.new("RGB", (64, 64), (30, 160, 60)))], "prompt": PROMPT, "steps": 2,
            "width": 64, "height": 64, "seed": 1, "sampler_index": "Euler", "denoising_strength": 0.5,
            "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]}
    r = requests.post(server[1] + "/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 1 and image(images[0]).size == (128, 128)
    assert "SD upscale upscaler: Lanczos" in image(images[0]).info["parameters"]


def test_prompt_matrix_and_prompts_from_file_through_the_api(server):
    r = requests.post(server[1] + "/txt2img", json={"prompt": "a circle|red", "steps": 2, "width": 64, "height": 64,
                                                    "script_name": "prompt matrix", "script_args": []}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3 and image(r.json()["images"][0]).size[0] == 128
    r = requests.post(server[1] + "/txt2img", json={
        "prompt": "", "steps": 2, "width": 64, "height": 64, "script_name": "Prompts from file or textbox",
        "script_args": [False, False, "start", "a cat\n--prompt dog --steps 3"]}, timeout=120)
    assert r.status_code == 200, r.text
    texts = [image(b).info["parameters"] for b in r.json()["images"]]
    assert texts[0].startswith("a cat\n") and texts[1].startswith("dog\nSteps: 3,")


@pytest.mark.parametrize("mode, extra, words", [
    ("txt2img", {"script_name": "Loopback", "script_args": []}, "Script 'Loopback' not found"),
    ("txt2img", {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2]}, "runs in img2img only"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": [50, "1"]}, "X type: 50 is not an axis"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": xyz(4, "2,200")}, "steps must be between 1 and 150"),
    ("txt2img", {"script_name": "x/y/z plot", "script_args": xyz(1, "1-20")}, "at most 16 per request"),
    ("txt2img", {"script_args": [1]}, "script_args: given without a script_name"),
    ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "'ADetailer' is not available"),
    ("img2img", {"script_name": "sd upscale", "script_args": ["", 8, "ESRGAN_4x", 2]}, "'ESRGAN_4x' is not"),
    ("img2img", {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 64]}, "scale_factor must be"),
])
def test_bad_script_requests_answer_422(server, mode, extra, words):
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, **extra}
    if mode == "img2img":
        body["init_images"] = [b64(Image.new("RGB", (64, 64)))]
    r = requests.post(f"{server[1]}/{mode}", json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_scripts_and_script_info(server, api):
    listed = api.get_scripts()
    assert listed == {"txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
                      "img2img": ["prompt matrix", "prompts from file or textbox", "sd upscale", "x/y/z plot"]}
    info = requests.get(server[1] + "/script-info", timeout=10).json()
    assert {(s["name"], s["is_img2img"]) for s in info} == \
        {(n, mode == "img2img") for mode, ns in listed.items() for n in ns}
    up = next(s for s in info if s["name"] == "sd upscale")
    assert up["is_alwayson"] is False
    assert [a["label"] for a in up["args"]] == ["Info", "Tile overlap", "Upscaler", "Scale Factor"]
    assert up["args"][1] == {"label": "Tile overlap", "value": 64, "minimum": 0, "maximum": 256, "step": 16,
                             "choices": None}
    assert up["args"][2]["choices"] == ["None", "Lanczos", "Nearest"]
    plot = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert len(plot["args"]) == 18 and plot["args"][0]["choices"][4] == "Steps"
