"""OpenAI's images API through the official `openai` client, API keys with per-key limits and the fair queue,
health probes and Prometheus metrics.

One live server on the embedded demo model with three client keys (and a fourth that holds the worker busy).
"""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.server import Limits, ServerConfig, create_app  # noqa: E402
from kiln.server.clients import ApiKey, FairQueue, KeyLimit, parse_api_keys  # noqa: E402

from serving import running  # noqa: E402

PROMPT = "a red circle on a blue background"
KEYS = [ApiKey("alice", "alice-key-0001", 10), ApiKey("bob", "bob-key-0002", 10), ApiKey("carol", "carol-key-0003"),
        ApiKey("dave", "dave-key-0004")]
AUTH = {k.name: {"Authorization": f"Bearer {k.key}"} for k in KEYS}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    app = create_app(ServerConfig(ckpt=str(EMBEDDED), outdir=str(tmp_path_factory.mktemp("out")), api_keys=KEYS,
                                  limits=Limits(max_size=256, queue_size=40)))
    with running(app) as (url, _):
        yield app, url


def client(url, key="bob-key-0002"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_idle(app, timeout=60):
    worker, deadline = app.state.worker, time.time() + timeout
    while worker.current is not None or worker.queue:
        assert time.time() < deadline, "the worker did not become idle"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- the openai client
def test_generate_two_images_as_the_pipeline_makes_them(live):
    app, url = live
    r = client(url).images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 4})
    assert len(r.data) == 2 and r.size == "64x64" and r.output_format == "png"
    got = [pixels(d.b64_json) for d in r.data]
    assert got[0].shape == (64, 64, 3)
    wait_idle(app)
    want = app.state.worker.pipe.txt2img(prompt=PROMPT, seed=5, steps=4, width=64, height=64, batch_size=2,
                                         sampler="euler", cfg_scale=7.0).pixels
    assert all(np.array_equal(g, w) for g, w in zip(got, want)), "seeds 5 and 6 should give the pipeline's pixels"


def test_generate_as_urls_with_a_named_model(live):
    app, url = live
    title = app.state.worker.model_title
    r = client(url).images.generate(prompt=PROMPT, n=1, size="64x64", response_format="url", model="demo",
                                    user="end-user-7", extra_body={"steps": 2})
    assert r.safety_identifier == "end-user-7"
    link = r.data[0].url
    assert link.startswith(url + "/api/v1/jobs/")
    assert requests.get(link, timeout=10).status_code == 401  # the same credentials protect the files
    png = requests.get(link, headers=AUTH["bob"], timeout=10)
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    with pytest.raises(openai.NotFoundError) as e:
        client(url).images.generate(prompt=PROMPT, model="dall-e-3")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    models = client(url).models.list()
    assert title in [m.id for m in models.data]
    assert client(url).models.retrieve(title).sha256 == app.state.worker.entry.sha256


def rgba_png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_edit_inpaints_inside_the_transparent_mask_only(live):
    _, url = live
    green = Image.new("RGB", (64, 64), (20, 200, 40))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI's convention: transparent = edit
    r = client(url).images.edit(image=("in.png", rgba_png(green), "image/png"),
                                mask=("mask.png", rgba_png(mask), "image/png"), prompt="a yellow star", n=1,
                                response_format="b64_json", extra_body={"seed": 3, "steps": 4})
    out = pixels(r.data[0].b64_json).astype(int)
    assert out.shape == (64, 64, 3)
    # outside the mask (beyond the tail of its blur of 4) the picture is kept exactly, inside the model painted
    assert np.array_equal(out[:6], np.broadcast_to(np.array([20, 200, 40]), out[:6].shape))
    assert np.abs(out[24:40, 24:40] - np.array([20, 200, 40])).mean() > 20


def test_edit_reads_the_images_own_transparency_without_a_mask(live):
    _, url = live
    im = Image.new("RGBA", (64, 64), (20, 200, 40, 255))
    im.paste((0, 0, 0, 0), (0, 32, 64, 64))  # the bottom half is to be drawn
    r = client(url).images.edit(image=("in.png", rgba_png(im), "image/png"), prompt="a yellow star",
                                extra_body={"seed": 4, "steps": 4})
    out = pixels(r.data[0].b64_json).astype(int)
    assert np.array_equal(out[:22], np.broadcast_to(np.array([20, 200, 40]), out[:22].shape))
    assert np.abs(out[40:] - np.array([20, 200, 40])).mean() > 20


@pytest.mark.parametrize("body, status, param, words", [
    ({"quality": "hd"}, 422, "quality", "not supported"),
    ({"background": "transparent"}, 422, "background", "opaque"),
    ({"complexity": "high"}, 422, "complexity", "unknown field complexity"),
    ({"size": "65x64"}, 422, "size", "multiples of 8"),
    ({"size": "big"}, 422, "size", "WIDTHxHEIGHT"),
    ({"n": 0}, 422, "n", "between 1 and"),
    ({"n": "many"}, 422, "n", "n:"),
    ({"model": "dall-e-3"}, 404, "model", "GET /v1/models"),  # code: model_not_found
    ({"response_format": "gif"}, 422, "response_format", "response_format"),
    ({"prompt": None}, 422, "prompt", "prompt"),
    ({"steps": 999}, 422, None, "steps must be between"),
])
def test_generation_errors_in_openais_shape(live, body, status, param, words):
    _, url = live
    r = requests.post(url + "/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", **body},
                      headers=AUTH["carol"], timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


def test_edit_errors_and_auth(live):
    _, url = live
    png = rgba_png(Image.new("RGB", (64, 64)))
    post = lambda files, data=None, h=AUTH["carol"]: requests.post(url + "/v1/images/edits", files=files,
                                                                    data=data or {"prompt": "x"}, headers=h,
                                                                    timeout=30)
    r = post({"image": ("a.png", png)}, h={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post({"mask": ("m.png", png)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = post({"image": ("a.png", png), "mask": ("m.png", png)})  # a mask without alpha says nothing
    assert r.status_code == 422 and "alpha channel" in r.json()["error"]["message"]
    r = post({"image": ("a.png", png), "mask": ("m.png", rgba_png(Image.new("RGBA", (32, 32))))})
    assert r.status_code == 422 and "same size" in r.json()["error"]["message"]
    r = post({"image": ("a.png", b"not an image")})
    assert r.status_code == 422 and r.json()["error"]["param"] is None
    r = post({"image": ("a.png", png)}, {"prompt": "x", "n": "two"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    r = post({"image": ("a.png", png)}, {"prompt": "x", "input_fidelity": "high"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "input_fidelity"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong-key-000").models.list()


# ---------------------------------------------------------------------------------------------- keys, fair queue
def test_twenty_clients_on_three_keys_take_turns(live):
    """alice floods the queue (12 clients, limit 10: two are told 429), bob and carol have 4 clients each: once
    the worker is free, jobs start in turns (alice, bob, carol, …), so bob's and carol's last jobs start within
    the first 12, not after alice's ten."""
    app, url = live
    wait_idle(app)
    body = {"prompt": PROMPT, "steps": 1, "width": 32, "height": 32, "seed": 1}
    # a long job holds the worker while the 20 clients submit (cancelled then: it stops at its next step)
    blocker = requests.post(url + "/api/v1/txt2img", json={**body, "steps": 150, "width": 128, "height": 128},
                            headers=AUTH["dave"], timeout=10).json()["id"]
    while app.state.worker.current is None:
        time.sleep(0.01)
    owners = ["alice"] * 12 + ["bob"] * 4 + ["carol"] * 4
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda who: (who, requests.post(url + "/api/v1/txt2img", json=body,
                                                                 headers=AUTH[who], timeout=30)), owners))
    refused = [r for who, r in answers if r.status_code == 429]
    assert len(refused) == 2 and all(who == "alice" for who, r in answers if r.status_code == 429)
    assert all(int(r.headers["Retry-After"]) >= 1 and "limit" in r.json()["detail"] for r in refused)
    jobs = {r.json()["id"]: who for who, r in answers if r.status_code == 202}
    assert len(jobs) == 18
    listed = [j["id"] for j in requests.get(url + "/api/v1/jobs", headers=AUTH["bob"], timeout=10).json()["queue"]]
    metrics = scrape(url)
    assert {s.labels["client"]: s.value for s in metrics["kiln_client_queued_jobs"].samples} == \
        {"alice": 10, "bob": 4, "carol": 4}
    cancelled = requests.post(f"{url}/api/v1/jobs/{blocker}/cancel", headers=AUTH["dave"], timeout=10).json()
    assert cancelled["state"] == "running", "the blocker ended before every client had submitted"
    wait_idle(app)
    worker = app.state.worker
    started = sorted(jobs, key=lambda i: worker.get(i).started)
    assert all(worker.get(i).state == "done" for i in jobs)
    order = [jobs[i] for i in started]
    for k in range(1, 5):  # every round of three serves each key once
        assert sorted(order[3 * (k - 1):3 * k]) == ["alice", "bob", "carol"], order
    assert order[12:] == ["alice"] * 6
    assert listed == [blocker] + started, "the queue listed the jobs in the order they then started"


def test_openai_route_answers_429_over_a_keys_limit(live):
    app, url = live
    wait_idle(app)
    worker = app.state.worker
    old = dict(worker.queue.limits)
    worker.queue.limits["carol"] = 1
    try:
        body = {"prompt": PROMPT, "steps": 150, "width": 64, "height": 64}
        first = requests.post(url + "/api/v1/txt2img", json=body, headers=AUTH["carol"], timeout=10).json()["id"]
        second = requests.post(url + "/api/v1/txt2img", json=body, headers=AUTH["carol"], timeout=10).json()["id"]
        with pytest.raises(openai.RateLimitError) as e:
            client(url, "carol-key-0003").images.generate(prompt=PROMPT, size="64x64")
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
        for job in (second, first):
            requests.post(f"{url}/api/v1/jobs/{job}/cancel", headers=AUTH["carol"], timeout=10)
    finally:
        worker.queue.limits = old
    wait_idle(app)


def test_fair_queue_order_remove_and_limits():
    job = lambda client, i: SimpleNamespace(client=client, i=i)
    q = FairQueue({"a": 3})
    jobs = [job("a", 0), job("a", 1), job("a", 2), job("b", 0), job("c", 0), job("b", 1)]
    for j in jobs:
        q.append(j)
    with pytest.raises(KeyLimit) as e:
        q.append(job("a", 3))
    assert e.value.ahead == 0  # a's first job is next
    assert [(j.client, j.i) for j in q] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert len(q) == 6 and jobs[4] in q and q.index(jobs[5]) == 4
    q.remove(jobs[4])
    assert jobs[4] not in q and q.waiting() == {"a": 3, "b": 2}
    assert [(j.client, j.i) for j in (q.popleft(), q.popleft())] == [("a", 0), ("b", 0)]
    q.append(job("c", 1))  # c joins behind a and b
    assert [(j.client, j.i) for j in q] == [("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    assert [q.popleft().client for _ in range(4)] == ["a", "b", "c", "a"] and not q
    with pytest.raises(IndexError):
        q.popleft()
    for i in range(4):  # a job store's restored queue goes past the limit
        q.append(job("a", i), check_limit=False)
    assert len(q) == 4
    q.append(job("b", 0))
    q.appendleft(job("b", -1))  # first of all: its lane moves to the front of the rotation
    assert [(j.client, j.i) for j in q][:4] == [("b", -1), ("a", 0), ("b", 0), ("a", 1)]


@pytest.mark.parametrize("text, words", [
    ("alice", "name:key"),
    ("al ice:0123456789", "the name must be"),
    ("alice:short", "at least 8"),
    ("alice:0123456789:0", "at least 1"),
    ("alice:0123456789\nalice:9876543210", "used twice"),
    ("alice:0123456789\nbob:0123456789", "another key's"),
    ("# nothing\n", "no keys"),
])
def test_api_keys_file_errors(text, words):
    with pytest.raises(KilnError, match=words):
        parse_api_keys(text)


def test_api_keys_file_format_and_cli(tmp_path, capsys):
    from kiln.cli import main

    keys = parse_api_keys("# team keys\nalice:0123456789abc:5\n\nbob:zyxwvu987654\n")
    assert [(k.name, k.max_queued) for k in keys] == [("alice", 5), ("bob", None)]
    assert "0123456789abc" not in repr(keys)
    bad = tmp_path / "keys.txt"
    bad.write_text("alice:short\n")
    assert main(["serve", "--api-keys", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- health, metrics
def scrape(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(url + "/metrics", headers=AUTH["dave"], timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_health_probes_and_metrics(live):
    from kiln.server.ops import not_ready

    app, url = live
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}  # no credentials needed
    ready = requests.get(url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["model"] == app.state.worker.model_title
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    client(url).images.generate(prompt=PROMPT, n=2, size="64x64", extra_body={"steps": 3})
    m = scrape(url)
    samples = [s for family in m.values() for s in family.samples]
    value = lambda name, **labels: next(s.value for s in samples
                                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("kiln_queue_depth") == 0
    assert value("kiln_jobs", state="done") >= 1 and value("kiln_jobs", state="running") == 0
    assert value("kiln_jobs_finished_total", state="done") >= 1
    assert value("kiln_images_total") >= 2
    assert value("kiln_step_duration_seconds_count") >= 2  # each of the job's 3 steps but the first
    assert value("kiln_job_duration_seconds_count") >= 1 and value("kiln_job_duration_seconds_sum") > 0
    assert value("kiln_model_load_seconds") > 0
    stopped = SimpleNamespace(entry=None, _stopping=True, threads=[])
    assert not_ready(stopped) == ["no model loaded", "the server is shutting down", "the worker thread is not running"]
