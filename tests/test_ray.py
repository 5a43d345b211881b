"""Ray: `kiln batch --ray` (Ray Data over an actor pool) against the in-process run, worker crashes, bad rows,
resuming; `kiln serve --ray` (Ray Serve) answering A1111's txt2img. One local Ray cluster for the module."""
import base64
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from kiln.demo.report import EMBEDDED  # noqa: E402
from kiln.distributed.batch import Defaults, run_batch  # noqa: E402

from serving import free_port, read_events  # noqa: E402

ROWS = [
    {"prompt": "a red circle on a blue background"},
    {"prompt": "a small yellow star in the top left on black", "seed": 1234},
    {"prompt": "a green square", "sampler": "DPM++ 2M Karras", "steps": 8},
    {"prompt": "a purple triangle at the bottom", "cfg_scale": 3},
    {"prompt": "a white circle on orange", "negative_prompt": "red", "width": 72},
    {"prompt": "an orange star", "sampler": "euler_a"},
    "this line is not JSON",
    {"prompt": "a blue square", "sampler": "no such sampler"},
    {"prompt": "a black circle on white", "steps": 12},
    {"prompt": "a large red triangle", "seed": 7},
    {"prompt": "a yellow circle on purple", "schedule": "karras", "sampler": "lms"},
    {"prompt": "a small green star at the right", "height": 72},
]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in ROWS))
    return path


def run(prompts, out, **kw):
    return run_batch(prompts, out, ckpt=str(EMBEDDED), defaults=Defaults(steps=10, seed=100), progress=False,
                     threads_per_worker=1, **kw)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def local_run(prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return run(prompts, out), out


def test_in_process_run_writes_every_good_row_and_reports_the_bad(local_run):
    summary, out = local_run
    assert (summary.rows, summary.ok, summary.errors) == (12, 10, 2)
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["row"] for e in entries] == list(range(12))
    bad = {e["row"]: e["error"] for e in entries if e["status"] == "error"}
    assert set(bad) == {6, 7} and "not a JSON object" in bad[6] and "unknown sampler" in bad[7]
    good = [e for e in entries if e["status"] == "ok"]
    assert [e["seed"] for e in good][:3] == [100, 1234, 102]  # base seed + row index unless the row has one
    for e in good:
        with Image.open(out / e["file"]) as im:
            assert f"Seed: {e['seed']}" in im.info["parameters"]
    assert pixels(out / "images/000004.png").shape == (64, 72, 3)


def test_two_ray_workers_match_the_in_process_run(cluster, prompts, local_run, tmp_path):
    _, local = local_run
    summary = run(prompts, tmp_path, use_ray=True, workers=2)
    assert (summary.ok, summary.errors) == (10, 2)
    assert (tmp_path / "manifest.jsonl").read_bytes() == (local / "manifest.jsonl").read_bytes()
    files = sorted(p.name for p in (local / "images").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "images").iterdir()) and len(files) == 10
    for name in files:
        assert np.array_equal(pixels(local / "images" / name), pixels(tmp_path / "images" / name)), name


def test_second_run_is_a_no_op(prompts, local_run):
    _, out = local_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    manifest = (out / "manifest.jsonl").read_bytes()
    summary = run(prompts, out)
    assert summary.skipped == 12 and (summary.ok, summary.errors) == (10, 2)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    assert (out / "manifest.jsonl").read_bytes() == manifest


def test_a_killed_worker_still_ends_with_every_row_written_once(cluster, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(12)))
    out, pids = tmp_path / "out", tmp_path / "pids"
    box = {}
    t = threading.Thread(target=lambda: box.update(s=run_batch(
        prompts, out, ckpt=str(EMBEDDED), defaults=Defaults(steps=25), progress=False, use_ray=True, workers=2,
        pid_dir=str(pids), threads_per_worker=1)))
    t.start()
    deadline = time.time() + 180
    while not (out / "images").is_dir() or len(list((out / "images").glob("*.png"))) < 2:
        assert time.time() < deadline and t.is_alive()
        time.sleep(0.05)
    victim = int(sorted(os.listdir(pids))[0])
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    assert box["s"].ok == 12 and box["s"].errors == 0
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["row"] for e in entries) == list(range(12))  # each row once
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(12)]
    assert len(os.listdir(pids)) >= 3, "the killed worker was not replaced"


def test_ray_serve_ingress_and_model_deployment(cluster, tmp_path):
    """Two model replicas behind the FastAPI ingress: A1111's txt2img answers with the pipeline's pixels, and the
    job API (ids, SSE progress with previews, results, the ingress' job store) works across replicas."""
    import torch
    from ray import serve

    from kiln.distributed.serve import build_app
    from kiln.pipeline import load
    from kiln.server import ServerConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServerConfig(save=False, outdir=None, data_dir=str(tmp_path))
    serve.run(build_app(config, num_replicas=2, max_ongoing_requests=1), name="kiln", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red circle on a blue background", "seed": 3, "steps": 10, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 5}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [3]
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert "Seed: 3" in im.info["parameters"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a replica has one CPU, hence one thread: the same kernels' summation order
    try:
        want = load(EMBEDDED, device="cpu").txt2img(body["prompt"], seed=3, steps=10, sampler="euler",
                                                    cfg_scale=5).pixels[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(im.convert("RGB")), want)

    jobs = [requests.post(f"{url}/api/v1/txt2img", json=dict(body, seed=s, steps=20), timeout=30).json()
            for s in (10, 11, 12)]
    assert all(j["state"] in ("queued", "running") for j in jobs)
    events = read_events(f"{url}/api/v1/jobs/{jobs[2]['id']}/events")
    assert events[-1][0] == "done" and events[-1][1]["seeds"] == [12]
    assert any(0 < d["progress"] < 1 for n, d in events if n == "progress")
    assert any(d.get("preview", "").startswith("data:image/png") for _, d in events)
    for j, seed in zip(jobs, (10, 11, 12)):
        deadline = time.time() + 120
        while (st := requests.get(f"{url}/api/v1/jobs/{j['id']}", timeout=10).json())["state"] != "done":
            assert st["state"] in ("queued", "running") and time.time() < deadline, st
            time.sleep(0.1)
        png = requests.get(url + st["image_urls"][0], timeout=10).content
        assert f"Seed: {seed}" in Image.open(io.BytesIO(png)).info["parameters"]
    history = requests.get(f"{url}/api/v1/jobs?state=done", timeout=10).json()["jobs"]
    assert [j["id"] for j in history] == [j["id"] for j in jobs][::-1]  # the ingress' store: newest first
    assert (tmp_path / "jobs.sqlite3").is_file()

    # The ingress finds models by the same names and hashes as the local server: one ModelIndex for both.
    from kiln.server.worker import ModelIndex

    local = ModelIndex.scan(None, None)
    listed = requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()
    assert [(m["title"], m["model_name"], m["sha256"]) for m in listed] == \
        [(e.title, e.name, e.sha256) for e in local.entries]
    entry = local.entries[0]
    for name in (entry.title, entry.filename, entry.name, entry.sha256, entry.sha256[:10], entry.sha256[:8]):
        r = requests.post(f"{url}/sdapi/v1/txt2img", timeout=120,
                          json=dict(body, steps=1, override_settings={"sd_model_checkpoint": name}))
        assert r.status_code == 200, (name, r.text)
    serve.delete("kiln")


def test_cli_batch_in_process(tmp_path, capsys):
    from kiln.cli import main

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed,steps\na red circle,5,4\nbad row,notanumber,4\n")
    assert main(["batch", str(prompts), "--outdir", str(tmp_path / "o"), "--threads", "1"]) == 1  # a row failed
    err = capsys.readouterr().err
    assert "2 rows: 1 written, 1 failed" in err
    assert (tmp_path / "o" / "images" / "000000.png").exists()
    assert main(["batch", str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_output_to_a_pyarrow_filesystem_uri(tmp_path):
    """`--outdir` may be any pyarrow filesystem URI (object stores in production; file:// here)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue star\n")
    summary = run(prompts, f"file://{tmp_path}/remote")
    assert (summary.ok, summary.errors) == (2, 0)
    entries = [json.loads(line) for line in (tmp_path / "remote" / "manifest.jsonl").read_text().splitlines()]
    assert [e["file"] for e in entries] == ["images/000000.png", "images/000001.png"]
    assert pixels(tmp_path / "remote" / "images" / "000001.png").shape == (64, 64, 3)
    assert run(prompts, f"file://{tmp_path}/remote").skipped == 2
    assert not [p for p in (tmp_path / "remote" / "images").iterdir() if p.name.startswith(".tmp")]
