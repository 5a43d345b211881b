"""The job store (kiln/server/store.py, history.py): jobs survive `kill -9` and restarts with their ids, seeds and
pixels; history paging, retention, delete; shutdown; no orphan or half-written file whenever the process dies.

Real `kiln serve` subprocesses for kill -9 and SIGTERM; an in-process harness for 20 crashes at random moments
(each crash stops every write of the "process" at once, as kill -9 does, and a fresh worker starts on the files).
"""
from __future__ import annotations

import io
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from kiln.server.store import JobStore  # noqa: E402

from serving import free_port  # noqa: E402

BODY = {"prompt": "a red circle on a blue background", "steps": 2, "width": 64, "height": 64, "cfg_scale": 5,
        "sampler_name": "Euler"}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def on_disk(out: Path) -> set[str]:
    return {f"samples/{p.name}" for p in (out / "samples").iterdir()} if (out / "samples").is_dir() else set()


def check_consistent(store: JobStore, out: Path, ids: list[str], images_per_job: int):
    """Every job done once: its images and files recorded, every file on disk claimed by exactly one job, no
    temp file, nothing left unclaimed."""
    files = []
    for job_id in ids:
        rec = store.get(job_id)
        assert rec["state"] == "done", rec
        assert len(store.images(job_id)) == images_per_job == len(rec["files"]) == rec["image_count"]
        files += rec["files"]
    assert len(files) == len(set(files)), "a file claimed twice"
    assert set(files) == on_disk(out), "orphan or missing files"
    assert not list(out.rglob(".tmp-*"))
    assert store.db.execute("SELECT COUNT(*) FROM unclaimed").fetchone()[0] == 0
    assert not store.db.execute("SELECT id FROM jobs WHERE state != 'done'").fetchall()


# ---------------------------------------------------------------------------------------------- the store itself
def test_store_records_pages_expires_and_recovers(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3", tmp_path)
    (tmp_path / "samples").mkdir()
    for k in range(5):
        store.put({"id": f"j{k}", "state": "queued", "created": 1000.0 + k, "params": {"seed": k}})
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    page, more = store.list(limit=2)
    assert [r["id"] for r in page] == ["j4", "j3"] and more
    page, more = store.list(limit=2, before="j3")
    assert [r["id"] for r in page] == ["j2", "j1"] and more
    assert [r["id"] for r in store.list(limit=2, before="j1")[0]] == ["j0"]
    (tmp_path / "samples/00000.png").write_bytes(b"png")
    store.reserve(["samples/00000.png"])
    assert store.update("j0", state="done", finished=1.0, files=["samples/00000.png"], images=[b"png"],
                        claim=["samples/00000.png"])
    store.update("j1", state="running", started=5.0)
    (tmp_path / "samples/00001.png").write_bytes(b"half")  # linked, never claimed: a crash before the record
    store.reserve(["samples/00001.png"])
    (tmp_path / "samples/.tmp-x").write_bytes(b"half")
    queued = JobStore(tmp_path / "jobs.sqlite3", tmp_path).recover()  # a restart
    assert [r["id"] for r in queued] == ["j1", "j2", "j3", "j4"] and queued[0]["restarts"] == 1
    assert on_disk(tmp_path) == {"samples/00000.png"} and not (tmp_path / "samples/.tmp-x").exists()
    assert [r["id"] for r in store.list(state="done")[0]] == ["j0"]
    for k in (2, 3):
        store.update(f"j{k}", state="failed", finished=time.time())
    assert store.expire(keep_jobs=2) == 1 and store.get("j0") is None  # the oldest finished one, and its file
    assert on_disk(tmp_path) == set() and store.images("j0") == []
    assert store.expire(keep_days=1) == 0
    store.update("j2", finished=time.time() - 2 * 86400)
    assert store.expire(keep_days=1) == 1 and store.get("j2") is None


# ---------------------------------------------------------------------------------------------- kill -9
class Serve:
    """`kiln serve` in a subprocess on the demo model."""

    def __init__(self, out: Path, *extra: str, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.log = out.parent / "serve.log"  # a file, not a pipe: a full pipe would block the server
        self.log_from = len(self.log.read_text()) if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--port", str(self.port),
                                          "--outdir", str(out), "--preview-every", "0", "--log-level", "warning",
                                          *extra], env=env, stdout=subprocess.DEVNULL, stderr=log)
        if wait:
            self.wait_ready()

    def said(self, text: str) -> bool:
        """Whether this server's stderr holds `text` (the log file is shared by the servers of a test)."""
        return text in self.log.read_text()[self.log_from:]

    def wait_ready(self):
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < deadline, "kiln serve did not start"
            try:
                requests.get(self.url + "/api/v1/info", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.2)

    def submit(self, **kw) -> dict:
        r = requests.post(self.url + "/api/v1/txt2img", json={**BODY, **kw}, timeout=10)
        assert r.status_code == 202, r.text
        return r.json()

    def status(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=10).json()

    def wait(self, ids, states=("done",), timeout=120) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            got = [self.status(i) for i in ids]
            if all(s["state"] in states for s in got):
                return got
            assert time.time() < deadline, [s["state"] for s in got]
            time.sleep(0.05)

    def image(self, job_id: str, n: int) -> np.ndarray:
        r = requests.get(f"{self.url}/api/v1/jobs/{job_id}/images/{n}", timeout=10)
        assert r.status_code == 200
        return pixels(r.content)

    def stop(self, sig=signal.SIGKILL, timeout=60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def test_kill_9_restart_then_sigterm(tmp_path):
    """Six jobs, `kill -9` once the first is done, a restart on the same outdir: all six end done with their ids
    and the pixels of an uninterrupted run. Then SIGTERM during a long job: new jobs get 503, the job outlasting
    --shutdown-timeout is recorded as queued and runs again (from its first step) at the next start.
    (One test: each `kiln serve` start costs seconds.)"""
    out = tmp_path / "out"
    server = Serve(out)
    seeds = [11, 12, 13, 14, 15, 16]
    ids = [server.submit(seed=s, steps=4)["id"] for s in seeds]
    server.wait(ids[:1])
    assert server.stop() == -signal.SIGKILL
    server = Serve(out, "--shutdown-timeout", "2")  # on the same outdir
    try:
        done = server.wait(ids)
        assert [s["id"] for s in done] == ids and [s["seeds"] for s in done] == [[s] for s in seeds]
        got = [server.image(i, 0) for i in ids]
        # an uninterrupted run of the same six requests on the restarted server
        again = [server.submit(seed=s, steps=4)["id"] for s in seeds]
        server.wait(again)
        for k, job_id in enumerate(again):
            assert np.array_equal(got[k], server.image(job_id, 0)), f"job {k}: pixels differ after the restart"
        listing = requests.get(server.url + "/api/v1/jobs?state=done&limit=100", timeout=10).json()
        assert [j["id"] for j in listing["jobs"]] == (ids + again)[::-1] and listing["next"] is None
    except BaseException:
        server.stop()
        raise
    check_consistent(JobStore(out / "jobs.sqlite3", out), out, ids + again, 1)
    sigterm(server, out, len(ids + again))


def sigterm(server, out, before: int):
    long = server.submit(seed=3, steps=150, width=128, height=128)["id"]  # tens of seconds on the demo model
    queued = server.submit(seed=4)["id"]
    server.wait([long], ("running",))
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal is handled between two bytecodes of the server's main thread
    r = requests.post(server.url + "/api/v1/txt2img", json=BODY, timeout=10)
    assert r.status_code == 503 and "shutting down" in r.json()["detail"] and r.headers["Retry-After"]
    assert server.proc.wait(60) == 0, server.log.read_text()
    store = JobStore(out / "jobs.sqlite3", out)
    assert store.get(long)["state"] == store.get(queued)["state"] == "queued"
    assert store.images(long) == [] and len(on_disk(out)) == before
    server = Serve(out)
    try:
        assert server.wait([long], ("running",))[0]["step"] < 150  # again, from its first step
        r = requests.delete(f"{server.url}/api/v1/jobs/{long}", timeout=10)
        assert r.status_code == 200 and r.json()["deleted"]
        assert server.wait([queued])[0]["state"] == "done"
        assert requests.get(f"{server.url}/api/v1/jobs/{long}", timeout=10).status_code == 404
        assert len(on_disk(out)) == before + 1
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- 20 x kill -9
STEPS_20 = 8  # jobs long enough that the status polls between kills do not drain the queue
LOADING, SERVING = "kiln: loading the model", "kiln: serving "  # kiln serve's lines around create_app (recovery)


@pytest.mark.slow
def test_twenty_kill_9_at_random_moments_of_a_twenty_job_run(tmp_path):
    """20 jobs through /api/v1/txt2img, then `kill -9` of the real `kiln serve` 20 times at moments drawn from a
    seeded RNG — during a restart (model load and the store's recovery) or while it serves (sampling, writing the
    files, idle once all are done) — each time started again on the same outdir; then it finishes. Every job is done
    exactly once with its id and the pixels of an uninterrupted in-process run; the store passes SQLite's integrity
    check; no orphan, partial or second file. Each start costs ~8 s (torch + the demo model), hence `slow`."""
    import sqlite3

    rng, out = random.Random(3220), tmp_path / "out"
    seeds = [300 + k for k in range(20)]
    args = ("--queue-size", "100", "--no-prepack")  # 20 jobs at once; the demo model loads a bit faster unpacked
    t0 = time.time()
    server = Serve(out, *args, wait=False)
    started = time.time()
    while not server.said(LOADING):
        time.sleep(0.02)
    loading = time.time()
    server.wait_ready()
    loads = [time.time() - loading]  # model load + the store's recovery: where a start-phase kill lands
    ids = [server.submit(seed=s, steps=STEPS_20)["id"] for s in seeds]
    assert time.time() - started < 120
    job_s = 0.3  # one 64 px job on the demo model until measured; kills spread over what is left
    phases = {"start": 0, "run": 0, "idle": 0}
    for kills_left in range(20, 0, -1):
        if kills_left < 20 and rng.random() < 0.3:  # during the restart that has just begun
            while not server.said(LOADING):
                assert server.proc.poll() is None, server.log.read_text()
                time.sleep(0.01)
            # a fraction of the quickest start seen: a warm page cache makes later starts faster than the first
            time.sleep(rng.uniform(0.15, 0.85) * min(loads))
            phases["start" if not server.said(SERVING) else "run"] += 1
        else:
            while not server.said(LOADING):
                assert server.proc.poll() is None, server.log.read_text()
                time.sleep(0.01)
            loading = time.time()
            server.wait_ready()
            loads.append(time.time() - loading)
            statuses = [server.status(i) for i in ids]
            left = sum(s["state"] != "done" for s in statuses)
            took = [s["finished"] - s["started"] for s in statuses if s["state"] == "done" and s["started"]]
            job_s = statistics.median(took) if took else job_s  # this machine's pace, not a guess
            deadline = time.time() + 30  # the clock starts once a job runs (a fresh process takes a moment)
            while left and time.time() < deadline:
                states = [server.status(i)["state"] for i in ids]
                if "running" in states or "queued" not in states:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 2 * job_s * left / kills_left + 0.05))
            phases["run" if left else "idle"] += 1
        assert server.stop() == -signal.SIGKILL
        server = Serve(out, *args, wait=False)
    server.wait_ready()
    try:
        done = server.wait(ids)
        assert [s["id"] for s in done] == ids and [s["seeds"] for s in done] == [[s] for s in seeds]
    finally:
        server.stop(signal.SIGTERM)
    wall = time.time() - t0
    db = sqlite3.connect(out / "jobs.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    store = JobStore(out / "jobs.sqlite3", out)
    check_consistent(store, out, ids, 1)  # one file per job on disk (none twice), no temp file, nothing unclaimed
    assert len(list((out / "samples").glob("*.png"))) == 20
    restarted = sum(bool(store.get(i).get("restarts")) for i in ids)
    assert phases["start"] >= 3 and phases["run"] >= 5 and restarted >= 3, (phases, restarted)
    reference = uninterrupted(tmp_path / "reference", seeds)
    for k, job_id in enumerate(ids):
        rel = store.get(job_id)["files"][0]
        assert np.array_equal(pixels((out / rel).read_bytes()), reference[k]), f"job {k} differs"
        assert np.array_equal(pixels(store.images(job_id)[0]), reference[k])
    store.close()
    print(f"20 x kill -9: {phases}, {restarted} jobs restarted, {wall:.0f} s")


def uninterrupted(out: Path, seeds: list[int]) -> list[np.ndarray]:
    """The same requests through the same route of an in-process app, never stopped."""
    from fastapi.testclient import TestClient

    from kiln.server import Limits, ServerConfig
    from kiln.server.app import create_app

    # as the servers ran: one thread (oneDNN splits sums by thread count), no pre-packing (--no-prepack)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(ServerConfig(outdir=str(out), preview_every=0, limits=Limits(queue_size=100), prepack=False))
    try:
        client = TestClient(app)
        ids = []
        for seed in seeds:
            r = client.post("/api/v1/txt2img", json={**BODY, "seed": seed, "steps": STEPS_20})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.time() + 120
        while any(client.get(f"/api/v1/jobs/{i}").json()["state"] != "done" for i in ids):
            assert time.time() < deadline
            time.sleep(0.05)
        return [pixels(client.get(f"/api/v1/jobs/{i}/images/0").content) for i in ids]
    finally:
        app.state.worker.stop()
        app.state.worker.history.store.close()
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- 20 random crashes
class Killed(BaseException):
    """kill -9 in-process: raised at the crash moment and by every write after it (nothing more reaches the disk;
    a BaseException, so no `except Exception` of the server's records anything on the way out)."""


class Crasher:
    """Counts the moments a process can die at (before and after each store transaction, after a temp file is
    written, after an output file is linked, at each sampler step) and dies at the `at`-th."""

    def __init__(self):
        self.left, self.dead = None, False

    def arm(self, at: int):
        self.left, self.dead = at, False

    def event(self):
        if self.dead:
            raise Killed
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                self.dead = True
                raise Killed


@pytest.fixture
def crasher(monkeypatch):
    import kiln.output.files as files
    from kiln.server import history
    from kiln.server.worker import Worker

    c = Crasher()
    transaction, write_temp, link, watch = (JobStore._transaction, files._write_temp, history._link_reserved,
                                            Worker._watch)

    def crashing_transaction(self, work):
        c.event()
        result = transaction(self, work)
        c.event()
        return result

    def crashing_watch(self, *args):
        hooks, reset = watch(self, *args)
        step = hooks["callback"]
        hooks["callback"] = lambda *a: (c.event(), step(*a))[1]
        return hooks, reset

    monkeypatch.setattr(JobStore, "_transaction", crashing_transaction)
    monkeypatch.setattr(files, "_write_temp", lambda *a: (write_temp(*a), c.event())[0])
    monkeypatch.setattr(history, "_link_reserved", lambda *a: (link(*a), c.event())[0])
    monkeypatch.setattr(Worker, "_watch", crashing_watch)
    hook = threading.excepthook
    monkeypatch.setattr(threading, "excepthook", lambda a: None if a.exc_type is Killed else hook(a))
    return c


def test_twenty_crashes_at_random_moments_lose_nothing_and_leave_no_orphan(tmp_path, pipe, crasher):
    from kiln.demo.report import EMBEDDED
    from kiln.server import Limits, ServerConfig
    from kiln.server.context import Server
    from kiln.server.history import JobLog
    from kiln.server.schemas import Txt2ImgRequest
    from kiln.server.worker import ModelIndex, Worker

    models, limits = ModelIndex.scan(None, None), Limits(queue_size=100)

    def start(out: Path) -> Worker:  # a fresh process on the files: the model is reused, nothing else
        w = Worker(models, str(EMBEDDED), limits, outdir=str(out), preview_every=0, loader=lambda *a, **k: pipe)
        try:
            w.attach(JobLog.open(None, str(out)))
        except Killed:
            bury(w)
            raise
        return w

    def bury(w: Worker):
        with w.cv:
            w._stopping = True
            w.cv.notify_all()
        for t in w.threads:
            t.join(60)
            assert not t.is_alive()
        if w.history is not None:
            w.history.store.close()

    def submit_all(w: Worker, seeds) -> list[str]:
        server = Server(ServerConfig(outdir=w.outdir, limits=limits), w)
        return [server.submit(Txt2ImgRequest(**BODY, seed=seed, n_iter=2), "txt2img", native=True).id
                for seed in seeds]

    def all_done(w: Worker, ids) -> bool:
        return w.history.store.db.execute("SELECT COUNT(*) FROM jobs WHERE state='done'").fetchone()[0] == len(ids)

    rng, out = random.Random(32), tmp_path / "out"
    worker = start(out)
    seeds = [100 + 2 * k for k in range(20)]
    ids = submit_all(worker, seeds)
    kills = 0
    while kills < 20:
        crasher.arm(rng.randint(1, 20))
        deadline = time.time() + 120
        while not crasher.dead and not all_done(worker, ids):
            assert time.time() < deadline
            time.sleep(0.01)
        if not crasher.dead:
            break
        kills += 1
        bury(worker)
        crasher.arm(None)
        worker = None
        while worker is None:  # a start can itself be killed (recovery writes too)
            crasher.arm(rng.randint(1, 20) if kills < 20 and rng.random() < 0.2 else None)
            try:
                worker = start(out)
            except Killed:
                kills += 1
    crasher.arm(None)
    while not all_done(worker, ids):
        time.sleep(0.02)
    assert kills >= 20, kills
    store = worker.history.store
    check_consistent(store, out, ids, 2)
    # the jobs that were running at a crash (and so ran again from their first step) against an uninterrupted run
    restarted = [(i, seed) for i, seed in zip(ids, seeds) if store.get(i).get("restarts")]
    assert len(restarted) >= 5, restarted
    got = {i: [pixels(png) for png in store.images(i)] for i, _ in restarted}
    bury(worker)
    reference = start(tmp_path / "uninterrupted")
    again = submit_all(reference, [seed for _, seed in restarted])
    while not all_done(reference, again):
        time.sleep(0.02)
    for (i, seed), j in zip(restarted, again):
        want = [pixels(png) for png in reference.history.store.images(j)]
        assert len(want) == 2 and all(np.array_equal(a, b) for a, b in zip(got[i], want)), f"seed {seed} differs"
    bury(reference)


def test_a_recovered_queued_job_keeps_its_client(tmp_path):
    """The fair queue's lane (`Job.client`, the API key's name) is in the record: after a restart the job waits
    in its client's lane, not in the anonymous one."""
    from kiln.server.history import JobLog
    from kiln.server.worker import Job

    log = JobLog.open(None, str(tmp_path))
    log.submitted(Job("txt2img", {"prompt": "a", "seed": 1}, client="alice"))
    log.submitted(Job("txt2img", {"prompt": "b", "seed": 2}))
    log.store.close()
    from kiln.server.clients import FairQueue

    again, queue = JobLog.open(None, str(tmp_path)), FairQueue()
    jobs = again.recover()
    assert [(j.params["seed"], j.client) for j in jobs] == [(1, "alice"), (2, "")]
    for job in jobs:
        queue.append(job)
    assert {name: [j.params["seed"] for j in lane] for name, lane in queue.lanes.items()} == {"alice": [1], "": [2]}
    again.store.close()


def test_serve_refuses_negative_store_flags(capsys):
    from kiln.cli import main

    for flag in ("--keep-days", "--keep-jobs", "--shutdown-timeout"):
        assert main(["serve", flag, "-1"]) == 1
        assert f"{flag} must be 0 or more" in capsys.readouterr().err


def test_params_round_trip_through_json():
    """Everything a job's params hold — images (init image, mask), tuples, ControlNet units — comes back equal."""
    import json

    from kiln.pipeline.control import ControlUnit
    from kiln.server.history import decode, encode

    init = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    mask = Image.new("L", (64, 64), 0)
    params = {"prompt": ["a", "b"], "seed": 7, "init_image": init, "mask": mask, "seed_resize_from": (64, 64),
              "refiner": ("x.safetensors", 0.8), "controlnets": [ControlUnit("cn.safetensors", init, weight=0.5)]}
    back = decode(json.loads(json.dumps(encode(params))))
    assert back["seed_resize_from"] == (64, 64) and back["refiner"] == ("x.safetensors", 0.8)
    assert np.array_equal(np.asarray(back["init_image"]), np.asarray(init)) and back["mask"].mode == "L"
    unit = back["controlnets"][0]
    assert isinstance(unit, ControlUnit) and unit.weight == 0.5 and np.array_equal(np.asarray(unit.image),
                                                                                  np.asarray(init))
    with pytest.raises(TypeError, match="cannot be stored"):
        encode({"model": object()})
