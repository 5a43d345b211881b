"""The job API's jobs in the job store (`store.JobStore`): recorded at submit and at each change of state, queued
again after a restart, their outputs published so that a crash leaves no orphan or half-written file.

The worker calls `submitted`, `started` and `ended`; `recover` gives back the jobs to queue at a start; `job`
rebuilds a finished job (with its images) from its record for the routes that read it.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import logging
import os
import time
from pathlib import Path

from .store import FINAL, JobStore
from .worker import Job

log = logging.getLogger("kiln.server")

# the Job fields a record holds (besides its params), as they are
FIELDS = ("id", "mode", "state", "created", "started", "finished", "error", "user_error", "model", "save",
          "styles", "step", "grids", "infotexts", "seeds", "prompts", "files", "flagged", "result_params",
          "model_title", "client")  # client: its lane in the fair queue after a restart


class JobLog:
    def __init__(self, store: JobStore, outdir: str | None, keep_days: float | None = None,
                 keep_jobs: int | None = None):
        self.store, self.outdir = store, outdir
        self.keep_days, self.keep_jobs = keep_days, keep_jobs

    @classmethod
    def open(cls, data_dir: str | None, outdir: str | None, keep_days=None, keep_jobs=None) -> JobLog:
        """The store file `DATA_DIR/jobs.sqlite3` (DATA_DIR: --data-dir, else --outdir); with neither, a store in
        memory that keeps the last `keep_jobs` jobs (default 100)."""
        folder = data_dir or outdir
        if folder is None:
            return cls(JobStore(":memory:"), None, keep_days, keep_jobs or 100)
        return cls(JobStore(Path(folder) / "jobs.sqlite3", outdir), outdir, keep_days, keep_jobs)

    # ------------------------------------------------------------------ the worker's calls
    def submitted(self, job: Job):
        try:
            rec = record(job)
        except TypeError as e:  # a parameter with no JSON form (a loaded model object): kept in memory only
            log.warning("job %s is not stored (%s): it will not survive a restart", job.id, e)
            return
        job.persist = True
        self.store.put(rec)

    def started(self, job: Job):
        self.store.update(job.id, state="running", started=job.started)

    def ended(self, job: Job, state: str) -> str:
        """A job left the worker in `state`: its files published and its record written; returns its state.
        One stopped by a shutdown is recorded as queued (it runs again, from its first step, at the next start);
        one deleted while running goes."""
        if job.discard:
            self.store.delete(job.id)
            return state
        if job.requeue:  # queued it is, here too: its event stream does not end as if it were over
            self.store.update(job.id, state="queued", started=None, step=0)
            return "queued"
        try:
            claim = self._publish(job) if job.pending and self.outdir else []
            fields = {k: v for k, v in record(job).items() if k not in ("params", "id", "created")}
            self.store.update(job.id, images=list(job.images), claim=claim, **dict(fields, state=state))
        except Exception as e:  # a full disk, say: the job fails here; the store still says running (it restarts)
            log.exception("job %s: its results could not be stored", job.id)
            job.error = f"the results could not be stored: {type(e).__name__}: {e}"
            return "failed"
        self.expire()
        return state

    def expire(self):
        if self.keep_days or self.keep_jobs:
            self.store.expire(self.keep_days, self.keep_jobs)

    def _publish(self, job: Job) -> list[str]:
        """The job's images saved to --outdir (as `Worker._collect` saves them for other jobs): each name
        reserved in the store, then linked into place; the caller's update claims them."""
        from ..output import OutputDir
        from ..output.files import png_data
        from ..output.pnginfo import encode_image, pnginfo_for

        out = OutputDir(self.outdir)
        fmt, quality = job.save_as
        for image, text in job.pending:
            if fmt == "png":
                data, ext = png_data(image, pnginfo_for("a1111", text, {})), "png"
            else:
                data, ext = encode_image(image, fmt, quality, text)
            job.files.append(_link_reserved(self.store, out, data, ext))
        job.pending = []
        return list(job.files)

    # ------------------------------------------------------------------ reading
    def recover(self) -> list[Job]:
        """The jobs to queue at a start, in their order (a running one again from its first step); a job whose
        ControlNet models or script cannot be rebuilt from a record fails, saying so."""
        jobs = []
        for rec in self.store.recover():
            if not rec.get("restartable", True):
                self.store.update(rec["id"], state="failed", finished=time.time(), error=(
                    "the server restarted before this job finished; its script cannot be restarted: submit it again"))
                continue
            jobs.append(job_of(rec, []))
        self.expire()
        return jobs

    def job(self, job_id: str) -> Job | None:
        rec = self.store.get(job_id)
        return None if rec is None else job_of(rec, self.store.images(job_id) if rec["state"] in FINAL else [])


def record(job: Job) -> dict:
    rec = {k: getattr(job, k) for k in FIELDS}
    rec.update(save_as=list(job.save_as), params=encode(job.params), restartable=job.script is None,
               image_count=len(job.images))
    return rec


def job_of(rec: dict, images: list[bytes]) -> Job:
    fields = {k: rec[k] for k in FIELDS if k in rec}
    job = Job(rec["mode"], decode(rec["params"]), save_as=tuple(rec.get("save_as") or ("png", 80)),
              **{k: v for k, v in fields.items() if k != "mode"})
    job.images, job.persist = images, True
    if job.state in FINAL:
        job.progress = 1.0 if job.state == "done" else 0.0
        job.done_event.set()
    return job


# ------------------------------------------------------------------ params as JSON
def encode(value):
    """A job's params as JSON values: images as PNG (base64), tuples and ControlNet units tagged."""
    from PIL import Image

    from ..pipeline.control import ControlUnit

    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"__png__": base64.b64encode(buf.getvalue()).decode("ascii")}
    if isinstance(value, ControlUnit):
        return {"__unit__": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a job parameter of type {type(value).__name__} cannot be stored")


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__png__" in value:
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(value["__png__"])))
        image.load()
        return image
    if "__unit__" in value:
        from ..pipeline.control import ControlUnit

        return ControlUnit(**{k: decode(v) for k, v in value["__unit__"].items()})
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    return {k: decode(v) for k, v in value.items()}


# ------------------------------------------------------------------ output files
def _link_reserved(store: JobStore, out, data: bytes, ext: str) -> str:
    """Write `data` to a temp file, reserve the next free samples/NNNNN name in the store, link the file there
    (the link fails if another writer took the name: then the next one). Returns the path relative to --outdir."""
    from ..output.files import _write_temp

    tmp = _write_temp(data, out.samples)
    try:
        n = out._next(out.samples, r"(\d{5,})\.(?:png|jpg|webp)")
        while True:
            rel = f"samples/{n:05}.{ext}"
            store.reserve([rel])
            try:
                os.link(tmp, out.root / rel)
                return rel
            except FileExistsError:  # another writer's file: not ours to remove at a recovery
                store.release([rel])
                n += 1
    finally:
        tmp.unlink(missing_ok=True)
