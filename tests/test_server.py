"""`kiln serve`: the real A1111 client (webuiapi) unchanged against our server, the job queue, cancel, auth, limits.

One server with the embedded demo model for the module; results are compared pixel for pixel with the same
Pipeline called directly, so "the image matches its seed" is checked exactly.
"""
import base64
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402

from serving import read_events, running  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copy(EMBEDDED, models / "other.safetensors")  # a second checkpoint to switch to
    out = tmp_path_factory.mktemp("out")
    loras = tmp_path_factory.mktemp("loras")
    make_lora(loras / "shapes_style.safetensors")
    embeddings = tmp_path_factory.mktemp("embeddings")
    make_embedding(embeddings / "crimsonish.safetensors")
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), ckpt_dir=str(models), outdir=str(out), lora_dir=str(loras),
                                  embeddings_dir=str(embeddings),
                                  limits=Limits(max_size=512, queue_size=4)))
    with running(app) as (url, port):
        yield app, url, port, out


def make_lora(path):
    import kiln
    from test_lora import low_rank, targets, write_kohya

    pipe = kiln.load(EMBEDDED, device="cpu")
    write_kohya(path, low_rank(targets(pipe)), pipe.cfg.unet.num_res_blocks, "diffusers", alpha=2)


def make_embedding(path):
    import kiln
    from safetensors.torch import save_file

    pipe = kiln.load(EMBEDDED, device="cpu")
    red = pipe.model.text_model.embeddings.token_embedding.weight[pipe.tokenizer.encode("red")].detach().clone()
    save_file({"emb_params": red}, str(path))


@pytest.fixture
def api(server):
    app, url, port, _ = server
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=10)


def direct(app, **kw):
    """The same generation through the Pipeline, in this thread (the worker is idle when this runs)."""
    worker = app.state.worker
    assert worker.current is None and not worker.queue
    return worker.pipe.txt2img(**kw).pixels


def wait_idle(app, timeout=60):
    worker = app.state.worker
    deadline = time.time() + timeout
    while worker.current is not None or worker.queue:
        assert time.time() < deadline, "the worker did not become idle"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- webuiapi
def test_webuiapi_txt2img_matches_the_pipeline(server, api):
    app = server[0]
    r = api.txt2img(prompt=PROMPT, negative_prompt="", seed=7, width=64, height=64, steps=10, cfg_scale=5,
                    sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [7, 8] and len(r.info["infotexts"]) == 2
    text = r.images[1].info["parameters"]
    assert "Seed: 8" in text and "Sampler: DPM++ 2M" in text and "Schedule type: Karras" in text
    assert r.parameters["prompt"] == PROMPT
    want = direct(app, prompt=PROMPT, seed=7, width=64, height=64, steps=10, cfg_scale=5, sampler="dpmpp_2m",
                  schedule="karras", batch_size=2)
    for got, exp in zip(r.images, want):
        assert np.array_equal(np.asarray(got.convert("RGB")), exp)


def test_plms_without_a_scheduler_takes_the_models_default(server, api):
    """The demo model's config makes PLMS default to CompVis' quad timesteps: A1111 clients that name no
    scheduler get it (and an infotext that says so); /api/v1/info tells the web UI."""
    app, url = server[0], server[1]
    r = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, steps=8, cfg_scale=5, sampler_name="PLMS")
    assert "Sampler: PLMS, Schedule type: Quad," in r.images[0].info["parameters"]
    want = direct(app, prompt=PROMPT, seed=5, width=64, height=64, steps=8, cfg_scale=5, sampler="plms",
                  schedule="quad")
    assert np.array_equal(np.asarray(r.images[0].convert("RGB")), want[0])
    info = requests.get(url + "/api/v1/info", timeout=10).json()
    assert {s["name"]: s["schedule"] for s in info["samplers"]}["plms"] == "quad"


def test_webuiapi_img2img_inpaint_keeps_the_unmasked_area(api):
    init = Image.new("RGB", (64, 64), (20, 200, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = api.img2img(images=[init], mask_image=mask, prompt="a yellow star on a green background", seed=3,
                    width=64, height=64, steps=10, denoising_strength=0.9, inpainting_fill=1, mask_blur=2)
    out = np.asarray(r.image.convert("RGB")).astype(int)
    assert r.image.size == (64, 64)
    assert "Denoising strength: 0.9" in r.info["infotexts"][0]
    # outside the mask (beyond the blur) the original pixels are pasted back exactly
    assert np.array_equal(out[:8], np.broadcast_to(np.array([20, 200, 40]), out[:8].shape))
    # inside, the model painted something else
    assert np.abs(out[24:40, 24:40] - np.array([20, 200, 40])).mean() > 20


def test_webuiapi_lists_samplers_schedulers_models(api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC", "LCM"} <= set(names)
    assert "karras" in api.util_get_scheduler_names()
    titles = api.util_get_model_names()
    assert any(t.startswith("demo.safetensors [") for t in titles)
    assert any(t.startswith("other.safetensors [") for t in titles)


def test_webuiapi_options_and_model_switch(server, api):
    opts = api.get_options()
    assert opts["sd_model_checkpoint"].startswith("demo.safetensors [")
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    r = api.txt2img(prompt=PROMPT, seed=1, width=64, height=64, steps=4)
    assert "Clip skip: 2" in r.info["infotexts"][0]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    other = next(t for t in api.util_get_model_names() if t.startswith("other."))
    api.util_set_model(other)  # loads the other checkpoint without a restart
    assert api.util_get_current_model() == other
    r = api.txt2img(prompt=PROMPT, seed=1, width=64, height=64, steps=4)
    assert "Model: other" in r.info["infotexts"][0]
    api.util_set_model(next(t for t in api.util_get_model_names() if t.startswith("demo.")))
    assert api.get_options()["sd_model_checkpoint"].startswith("demo.")


def test_webuiapi_png_info_round_trip(api):
    r = api.txt2img(prompt="a green (star:1.2), small", seed=11, width=64, height=64, steps=4)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Seed"] == "11" and info.parameters["prompt"] == "a green (star:1.2), small"


def test_webuiapi_progress_then_interrupt(server, api):
    app = server[0]
    box = {}
    t = threading.Thread(target=lambda: box.update(r=api.txt2img(prompt=PROMPT, seed=5, width=256, height=256,
                                                                  steps=150)))
    t.start()
    seen = None
    deadline = time.time() + 60
    while time.time() < deadline:
        p = api.get_progress()
        if p["progress"] > 0 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress with a preview image was reported during the run"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150 and seen["eta_relative"] >= 0
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size[0] > 0
    api.interrupt()
    t.join(timeout=30)
    assert not t.is_alive(), "interrupt did not end the request"
    r = box["r"]
    assert r.info["kiln_state"] == "interrupted" and r.images == []
    p = api.get_progress()
    assert p["progress"] == 0 and p["state"]["job_count"] == 0
    wait_idle(app)


def test_webuiapi_skip_moves_to_the_next_batch(api):
    box = {}
    t = threading.Thread(target=lambda: box.update(r=api.txt2img(prompt=PROMPT, seed=20, width=128, height=128,
                                                                  steps=60, n_iter=2)))
    t.start()
    deadline = time.time() + 60
    while api.get_progress()["state"]["sampling_step"] < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    api.skip()
    t.join(timeout=60)
    assert box["r"].info["all_seeds"] == [21]  # the first batch (seed 20) was skipped, the second ran


# ---------------------------------------------------------------------------------------------- queue
def test_twenty_concurrent_submissions_none_lost(server):
    app, url, _, _ = server
    wait_idle(app)

    def submit(seed):
        return seed, requests.post(f"{url}/api/v1/txt2img", json={"prompt": PROMPT, "seed": seed, "steps": 12,
                                                                   "width": 64, "height": 64,
                                                                   "sampler_name": "Euler"}, timeout=60)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(100, 120)))
    accepted = {seed: r.json()["id"] for seed, r in answers if r.status_code == 202}
    rejected = [r for _, r in answers if r.status_code == 503]
    assert len(accepted) + len(rejected) == 20, [r.status_code for _, r in answers]
    assert len(accepted) >= 4 and rejected, "a queue of 4 should both accept and refuse 20 at once"
    assert all(int(r.headers["Retry-After"]) >= 1 for r in rejected)
    deadline = time.time() + 120
    status = {}
    for seed, job_id in accepted.items():
        while True:
            status[seed] = requests.get(f"{url}/api/v1/jobs/{job_id}", timeout=10).json()
            if status[seed]["state"] not in ("queued", "running"):
                break
            assert time.time() < deadline
            time.sleep(0.1)
    assert all(s["state"] == "done" for s in status.values())
    wait_idle(app)
    for seed, s in status.items():
        png = requests.get(url + s["image_urls"][0], timeout=10).content
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        want = direct(app, prompt=PROMPT, seed=seed, steps=12, width=64, height=64, sampler="euler", cfg_scale=7.0)
        assert np.array_equal(got, want[0]), f"seed {seed}: the image differs from the pipeline's"
        assert s["seeds"] == [seed] and s["files"][0].startswith("samples/")


def test_cancel_removes_a_queued_job_and_stops_a_running_one_within_a_step(server):
    app, url, _, _ = server
    wait_idle(app)
    body = {"prompt": PROMPT, "seed": 1, "steps": 150, "width": 256, "height": 256}
    a = requests.post(f"{url}/api/v1/txt2img", json=body, timeout=10).json()
    b = requests.post(f"{url}/api/v1/txt2img", json=dict(body, seed=2), timeout=10).json()
    assert b["state"] == "queued" and b["position"] >= 1
    listing = requests.get(f"{url}/api/v1/jobs", timeout=10).json()["queue"]
    assert [j["id"] for j in listing][:2] == [a["id"], b["id"]]
    cancelled = requests.post(f"{url}/api/v1/jobs/{b['id']}/cancel", timeout=10).json()
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None
    deadline = time.time() + 60
    while requests.get(f"{url}/api/v1/jobs/{a['id']}", timeout=10).json()["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    at_cancel = requests.post(f"{url}/api/v1/jobs/{a['id']}/cancel", timeout=10).json()["step"]
    while (s := requests.get(f"{url}/api/v1/jobs/{a['id']}", timeout=10).json())["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.02)
    assert s["state"] == "interrupted"
    assert s["step"] <= at_cancel + 1, (s["step"], at_cancel)
    assert requests.get(f"{url}/api/v1/jobs/{b['id']}", timeout=10).json()["step"] == 0


def test_sse_stream_reports_progress_previews_and_the_end(server):
    app, url, _, _ = server
    job = requests.post(f"{url}/api/v1/txt2img", json={"prompt": PROMPT, "seed": 9, "steps": 20, "width": 64,
                                                        "height": 64}, timeout=10).json()
    events = read_events(f"{url}/api/v1/jobs/{job['id']}/events", timeout=60)
    names = [n for n, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    progress = [d["progress"] for n, d in events if n == "progress"]
    assert progress == sorted(progress) and any(0 < p < 1 for p in progress)
    assert any(d.get("preview", "").startswith("data:image/png;base64,") for _, d in events)
    final = events[-1][1]
    assert final["seeds"] == [9] and "Seed: 9" in final["infotexts"][0]


# ---------------------------------------------------------------------------------------------- limits, auth
@pytest.fixture(scope="module")
def strict(server):
    """A second app on the same worker, with tight limits and credentials (no second model load)."""
    from fastapi.testclient import TestClient

    app = create_app(ServerConfig(limits=Limits(max_size=128, max_image_pixels=128 * 128, max_body_bytes=200_000,
                                                max_prompt_chars=100),
                                  api_auth=[("ann", "s3cret")], token="tok"), worker=server[0].state.worker)
    return app, TestClient(app, headers={"Authorization": "Bearer tok"})


def b64png(im, **kw):
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body, status, words", [
    ({"width": 132}, 422, "multiple of 8"),
    ({"width": 256}, 422, "between 8 and 128"),
    ({"steps": 151}, 422, "steps"),
    ({"steps": 0}, 422, "steps"),
    ({"batch_size": 9}, 422, "batch_size"),
    ({"prompt": "x" * 101}, 422, "longer than"),
    ({"sampler_name": "Nonsense 3000"}, 404, "Sampler not found"),
    ({"cfg_scale": 1e9}, 422, "cfg_scale"),
    ({"seed": -5}, 422, "seed"),
    ({"sampler_name": "TCD", "eta": 1.5}, 422, "eta must be between 0 and 1"),
    ({"sampler_name": "TCD", "steps": 60}, 422, "lcm schedule has at most 50 steps"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 422, "unknown model"),
])
def test_limits_are_enforced_before_queueing(strict, body, status, words):
    _, client = strict
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "width": 64, "height": 64, "steps": 2, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_images_are_decoded_safely(strict):
    _, client = strict
    ok = {"prompt": "a", "width": 64, "height": 64, "steps": 2}
    r = client.post("/sdapi/v1/img2img", json={**ok, "init_images": ["not base64 !!"]})
    assert r.status_code == 422 and "init_images[0]" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**ok, "init_images": [base64.b64encode(b"GIF89a junk").decode()]})
    assert r.status_code == 422
    bomb = b64png(Image.new("1", (20000, 20000)))  # a few KB that would decode to 400 M pixels
    assert len(bomb) < 100_000
    r = client.post("/sdapi/v1/img2img", json={**ok, "init_images": [bomb]})
    assert r.status_code == 422 and "larger than the server's limit" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**ok, "init_images": ["A" * 300_000]})
    assert r.status_code == 413


def test_auth_guards_every_endpoint_but_the_ui_files(strict):
    from fastapi.testclient import TestClient

    app, _ = strict
    anon = TestClient(app)
    from kiln.server.ops import PROBES

    routes = [(m.upper(), path.replace("{job_id}", "x").replace("{index}", "0").replace("{model_id}", "x"))
              for path, ops in app.openapi()["paths"].items() for m in ops if path not in PROBES]
    assert len(routes) >= 29
    for path in PROBES:  # health probes answer without credentials (load balancers send none)
        assert anon.get(path).status_code == 200
    for method, path in routes + [("GET", "/openapi.json"), ("GET", "/docs")]:
        r = anon.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert anon.get("/").status_code == 200
    assert anon.get("/static/app.js").status_code == 200
    basic = lambda u, p: {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
    assert anon.get("/sdapi/v1/options", headers=basic("ann", "s3cret")).status_code == 200
    assert anon.get("/sdapi/v1/options", headers=basic("ann", "wrong")).status_code == 401
    assert anon.get("/sdapi/v1/options", headers={"Authorization": "Bearer tok"}).status_code == 200
    assert anon.get("/sdapi/v1/options", headers={"Authorization": "Bearer nope"}).status_code == 401
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    api.session = anon  # webuiapi's calls, through the ASGI test client
    api.set_auth("ann", "s3cret")
    assert any(s["name"] == "Euler a" for s in api.get_samplers())


def test_output_names_never_come_from_the_request(server):
    app, url, _, out = server
    body = {"prompt": "../../../etc/passwd", "seed": 1, "steps": 2, "width": 64, "height": 64, "save_images": True}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "outdir_samples": "/tmp/evil", "filename": "x"},
                      timeout=60)
    assert r.status_code == 422 and "unknown fields filename, outdir_samples" in r.json()["detail"]
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "override_settings": {"outdir_samples": "/tmp/evil"}},
                      timeout=60)
    assert r.status_code == 422 and "outdir_samples would set a server path" in r.json()["detail"]
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200
    files = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*.png"))
    assert files and all(f.startswith("samples/") and Path(f).name[:5].isdigit() for f in files)
    assert not Path("/tmp/evil").exists()


def test_serve_cli_rejects_bad_settings(capsys):
    from kiln.cli import main

    assert main(["serve", "--api-auth", "nopassword"]) == 1
    assert "user:password" in capsys.readouterr().err
    assert main(["serve", "--ckpt", "/nonexistent.safetensors"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_lora_tags_through_the_api_and_clean_removal(server, api):
    app = server[0]
    assert [x["name"] for x in api.get_loras()] == ["shapes_style"]
    kw = dict(seed=4, width=64, height=64, steps=6, sampler_name="Euler")
    plain = api.txt2img(prompt=PROMPT, **kw)
    styled = api.txt2img(prompt=PROMPT + " <lora:shapes_style:1>", **kw)
    again = api.txt2img(prompt=PROMPT, **kw)
    assert 'Lora hashes: "shapes_style: ' in styled.info["infotexts"][0]
    a, b, c = (np.asarray(r.image.convert("RGB")).astype(int) for r in (plain, styled, again))
    assert np.abs(a - b).mean() > 2 and np.array_equal(a, c)  # applied for its request only
    missing = requests.post(f"{server[1]}/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", **kw}, timeout=60)
    assert missing.status_code == 422 and "no LoRA named 'nope'" in missing.json()["detail"]
    wait_idle(app)


def test_embeddings_listed_and_used(api):
    listed = api.get_embeddings()
    assert list(listed["loaded"]) == ["crimsonish"] and listed["loaded"]["crimsonish"]["vectors"] == 1
    kw = dict(seed=4, width=64, height=64, steps=4, sampler_name="Euler")
    ti = api.txt2img(prompt="a crimsonish circle on a blue background", **kw)
    words = api.txt2img(prompt="a red circle on a blue background", **kw)
    assert 'TI hashes: "crimsonish: ' in ti.info["infotexts"][0]
    diff = np.abs(np.asarray(ti.image.convert("RGB")).astype(int) - np.asarray(words.image.convert("RGB")))
    assert diff.max() <= 1  # the embedding is the word "red"
