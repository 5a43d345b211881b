"""One model worker behind a bounded FIFO queue: jobs with ids, per-job progress and previews, cancel.

The worker thread owns the pipeline (loaded once, kept warm); every front end (A1111 API, native API, web UI)
submits `Job`s and reads their state. Cancelling a running job takes effect at the next sampler step.
"""
from __future__ import annotations

import contextlib

import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..errors import KilnError
from ..output import png_bytes
from ..pipeline.facts import ModelFacts
from .clients import FairQueue, current_client
from .model_index import ModelEntry, ModelIndex  # noqa: F401 (importers take them from here)

log = logging.getLogger("kiln.server")
# live previews take at most this share of a job's sampling time (a due preview waits while the last one cost more):
# a TAESD preview after every step of SD 1.5 at 512x512 measured +8.7 % a step on a 2-core CPU, +3.4 % with this
# budget (benchmarks/taesd_bench.py, docs/taesd.md)
PREVIEW_SHARE = 0.05


@dataclass
class Limits:
    """What one request may ask for. Sizes and steps are checked before a job is queued."""
    max_size: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_prompt_chars: int = 10_000
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 64 * 1024 * 1024
    queue_size: int = 16
    keep_jobs: int = 100  # finished jobs (with their images) kept for status/results


class QueueFull(Exception):
    def __init__(self, retry_after: int, message: str = "the queue is full; retry later"):
        super().__init__(message)
        self.retry_after = retry_after


class Interrupted(Exception):
    pass


class Skipped(Exception):
    pass


FINAL = ("done", "failed", "cancelled", "interrupted")


@dataclass
class Job:
    mode: str  # txt2img | img2img | load
    params: dict  # pipeline keyword arguments, plus prompt/seed/n_iter/batch_size (see `Worker._generate`)
    model: str | None = None  # a model title to switch to first (override_settings / options)
    save: bool = False
    script: Any = None  # a prepared A1111 script (`kiln.scripts.Plan`) that makes the images instead
    save_as: tuple = ("png", 80)  # (file type, JPEG/WebP quality) of saved files: the samples_format option
    styles: list = field(default_factory=list)  # the style names the request asked for (its prompts hold them)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    client: str = field(default_factory=current_client)  # who submitted it (API key name): its lane in the queue
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    user_error: bool = False  # the error is about the request (422), not the server (500)
    step: int = 0  # sampler steps run so far (all batches)
    progress: float = 0.0
    batch_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    images: list = field(default_factory=list)  # PNG bytes, each with its infotext
    grids: int = 0  # how many of the images are grids (a script's, first)
    infotexts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    files: list = field(default_factory=list)
    flagged: list = field(default_factory=list)
    preview: bytes | None = None
    preview_step: int = -1
    notices: list = field(default_factory=list)  # what the generation said (logged when the job ends)
    version: int = 0
    result_params: dict | None = None
    model_title: str | None = None
    persist: bool = False  # in the job store (`history.JobLog`): its files are saved when it ends
    pending: list = field(default_factory=list)  # (image, infotext) to save when it ends (persisted jobs)
    requeue: bool = False  # stopped by a shutdown: recorded as queued, to run again at the next start
    discard: bool = False  # deleted while running: its record goes when it ends
    cancel_event: threading.Event = field(default_factory=threading.Event)
    skip_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def n_images(self) -> int:
        return self.params.get("batch_size", 1) * self.params.get("n_iter", 1)

    def eta(self) -> float | None:
        if self.state != "running" or not self.started or self.progress <= 0:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.progress - elapsed)

    def status(self, position: int | None = None) -> dict:
        return {"id": self.id, "mode": self.mode, "state": self.state, "position": position,
                "progress": round(self.progress, 4), "step": self.step, "batch": self.batch_no,
                "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps,
                "eta": None if self.eta() is None else round(self.eta(), 2), "created": self.created,
                "started": self.started, "finished": self.finished, "error": self.error,
                "images": len(self.images), "seeds": list(self.seeds), "infotexts": list(self.infotexts),
                "files": list(self.files), "model": self.model_title, "grids": self.grids,
                "styles": list(self.styles)}


class Observer:
    """What the worker tells about its work as it happens (`kiln.server.ops.Metrics` counts it); the default
    does nothing. Called from the worker's threads."""

    def step(self, job: Job):
        pass

    def job_finished(self, job: Job):
        pass


class Worker:
    def __init__(self, models: ModelIndex, first_model: str, limits: Limits, *, device="auto", precision="auto",
                 outdir: str | None = None, preview_every: int = 1, safety_checker: str | None = None,
                 loader=None, lora_dir: str | None = None, embeddings_dir: str | None = None,
                 load_options: dict | None = None, upscalers=None, decoders: tuple = (None, None)):
        from ..pipeline import load

        self.models = models
        self.limits = limits
        self.device, self.precision = device, precision
        self.outdir = outdir
        self.preview_every = preview_every
        self.safety_checker = safety_checker
        self.lora_dir = lora_dir
        self.embeddings_dir = embeddings_dir
        self.upscalers = upscalers  # kiln.pipeline.upscalers.Upscalers, shared with the extras API (None: the pipe's)
        self.vae_approx_dir, self.preview_decoder = decoders  # TAESD: see `_set_decoders`
        self._load = loader or load
        self.load_options = load_options or {}  # more `kiln.load` arguments: offload, prepack
        self.pipe = None
        self.entry: ModelEntry | None = None
        self._refiner_pipe = None  # (path, Pipeline) of the last refiner a job asked for
        self._init_queue()
        self._switch(models.entry_for(first_model))
        self.options["sd_model_checkpoint"] = self.model_title
        self.start_threads(1)

    def _init_queue(self):
        self.cv = threading.Condition()
        self.queue = FairQueue()  # one lane per client, served in turn (clients.py)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: list[Job] = []  # one job here; a Ray Serve ingress dispatches several at once
        from .options import defaults

        self.options = defaults()  # A1111's settings (options.py); "sd_model_checkpoint": the model jobs run on
        self._durations = deque(maxlen=20)
        self._stopping = False
        self.observer = Observer()
        self.load_seconds: float | None = None
        self.history = None  # history.JobLog: the job store, set by `attach`

    def attach(self, history):
        """Record the job API's jobs in `history` from now on; queue the jobs it had queued (a restart)."""
        jobs = history.recover()
        with self.cv:
            self.history = history
            for job in jobs:
                self.queue.append(job, check_limit=False)  # the store's jobs were accepted once
                self.jobs[job.id] = job
            self.cv.notify_all()
        if jobs:
            log.info("%d jobs queued again from the job store", len(jobs))

    def start_threads(self, n: int):
        self.threads = [threading.Thread(target=self._loop, name=f"kiln-worker-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------------ model
    def _switch(self, entry: ModelEntry):
        if self.entry is not None and entry.path == self.entry.path:
            return
        log.info("loading %s", entry.path)
        start = time.perf_counter()
        pipe = self._load(str(entry.path), device=self.device, precision=self.precision, **self.load_options)
        if self.safety_checker:
            pipe.load_safety_checker(self.safety_checker)
        pipe.lora_dir, pipe.embeddings_dir = self.lora_dir, self.embeddings_dir
        if self.upscalers is not None:
            pipe.upscalers = self.upscalers
        else:
            self.upscalers = pipe.upscalers
        self._set_decoders(pipe, strict=self.pipe is None)
        self.pipe, self.entry = None, None
        import gc

        gc.collect()
        self.pipe = pipe
        self.facts = ModelFacts.of(pipe)
        if entry.sha256 is None:
            from ..checkpoints.hashes import full_sha256

            entry.sha256 = full_sha256(entry.path)
        self.entry = entry
        self.load_seconds = time.perf_counter() - start  # with the safety checker and the hash (/metrics)

    def _set_decoders(self, pipe, strict: bool):
        """The model's TAESD: where the decoder "TAESD" is looked up (sd_vae_decode_method), and the previews'
        decoder: --preview-decoder (refused for the first model if it does not fit; for a model switched to
        later, left out with a warning), else the model's file in the folder, else none (the VAE or the
        latent approximation, as `_watch` chooses)."""
        from ..pipeline.decoders import APPROX_DIR, TAESD, find_approx

        pipe.vae_approx_dir = self.vae_approx_dir or APPROX_DIR
        if self.preview_decoder:
            try:
                pipe.set_preview_decoder(self.preview_decoder)
                return
            except KilnError as e:
                if strict:
                    raise
                log.warning("%s: its previews are made without it", e)
        if find_approx(pipe.vae_approx_dir, pipe.cfg):
            pipe.set_preview_decoder(TAESD)

    @property
    def model_title(self) -> str:
        return self.entry.title

    # ------------------------------------------------------------------ queue
    def submit(self, job: Job, persist: bool = False) -> Job:
        """Queue `job`; with `persist` (the job API's jobs) it is recorded in the job store as well."""
        with self.cv:
            if self._stopping:
                raise QueueFull(5, "the server is shutting down; retry later")
            if len(self.queue) >= self.limits.queue_size:
                raise QueueFull(max(1, int(self.job_seconds() * (len(self.queue) + 1) + 0.999)))
            self.queue.append(job)  # a key over its limit raises here, before the store records the job
            if persist and self.history is not None:
                try:
                    self.history.submitted(job)
                except BaseException:
                    self.queue.remove(job)
                    raise
            self.jobs[job.id] = job
            self._evict()
            self.cv.notify_all()
        return job

    def job_seconds(self) -> float:
        """A job's running time, on average over the last ones (5 s before any): for Retry-After."""
        return (sum(self._durations) / len(self._durations)) if self._durations else 5.0

    def _evict(self):
        finished = [j for j in self.jobs.values() if j.state in FINAL]
        for j in finished[: max(0, len(finished) - self.limits.keep_jobs)]:
            del self.jobs[j.id]

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if self.history is not None and (job is None or job.persist and job.state in FINAL):
            job = self.history.job(job_id)  # the store's word for an ended job: retention may have deleted it
        return job

    def delete(self, job: Job):
        """Cancel `job` and remove it (its record, images and files) now, or when it ends if it is running."""
        with self.cv:
            self.cancel(job)
            self.jobs.pop(job.id, None)
            if job in self.running:
                job.discard = True
            elif job.persist:
                self.history.store.delete(job.id)

    def position(self, job: Job) -> int | None:
        with self.cv:
            try:
                return self.queue.index(job) + 1
            except ValueError:
                return 0 if job in self.running else None

    def listing(self) -> list[dict]:
        with self.cv:
            jobs = list(self.running) + list(self.queue)
            return [j.status(i) for i, j in enumerate(jobs)]

    def cancel(self, job: Job) -> bool:
        """Queued: removed from the queue. Running: stops at the next step. Finished: nothing to do."""
        with self.cv:
            if job in self.queue:
                self.queue.remove(job)
                job.state, job.finished = "cancelled", time.time()
                if job.persist:
                    self.history.ended(job, job.state)
                job.version += 1
                job.done_event.set()
                self.observer.job_finished(job)
                return True
            if job in self.running:
                job.cancel_event.set()
                return True
        return False

    @property
    def current(self) -> Job | None:
        """The job A1111's /progress, /interrupt and /skip are about: the oldest running one."""
        running = self.running
        return running[0] if running else None

    def interrupt(self):
        with self.cv:
            if self.current is not None:
                self.current.cancel_event.set()

    def skip(self):
        with self.cv:
            if self.current is not None:
                self.current.skip_event.set()

    def stop(self, timeout: float = 0.0):
        """Refuse new jobs; give the running ones `timeout` seconds to finish, then stop them at their next step.
        Stored jobs stopped or left in the queue stay queued in the store: the next start runs them."""
        with self.cv:
            self._stopping = True
            self.cv.notify_all()
            self.cv.wait_for(lambda: not self.running, timeout)
            for job in list(self.queue):
                if job.persist:
                    self.queue.remove(job)
                else:
                    self.cancel(job)
            for job in self.running:
                job.requeue = job.persist
                job.cancel_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def _loop(self):
        while True:
            with self.cv:
                while not self.queue and not self._stopping:
                    self.cv.wait()
                if self._stopping:
                    return
                job = self.queue.popleft()
                self.running.append(job)
                job.state, job.started = "running", time.time()
                job.version += 1
            end = "failed"
            try:
                if job.persist:
                    self.history.started(job)
                self._run(job)
                end = "interrupted" if job.cancel_event.is_set() else "done"
            except Interrupted:
                end = "interrupted"
            except KilnError as e:
                end, job.error, job.user_error = "failed", str(e), True
            except MemoryError:
                end, job.error = "failed", "out of memory: ask for fewer or smaller images"
            except Exception as e:  # a bug: keep serving, tell the client, log the traceback
                log.exception("job %s failed", job.id)
                end, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            finally:
                job.finished = time.time()
                if job.persist:  # files saved and the record written before anyone sees the end state
                    end = self.history.ended(job, end)
                with self.cv:
                    job.state = end
                    self.running.remove(job)
                    if job.state == "done":
                        job.progress = 1.0
                        self._durations.append(job.finished - job.started)
                    job.version += 1
                    job.done_event.set()
                    self.cv.notify_all()
                self.observer.job_finished(job)

    # ------------------------------------------------------------------ running
    def _run(self, job: Job):
        if job.model is not None:
            entry = self.models.find(job.model)
            if entry is None:
                raise KilnError(f"unknown model {job.model!r}; GET /sdapi/v1/sd-models lists them")
            self._switch(entry)
        job.model_title = self.model_title
        if job.mode == "load":
            return
        with self._refiner(job.params.get("refiner")):
            self._generate(job)

    @contextlib.contextmanager
    def _refiner(self, refiner):
        """The job's refiner (title, switch) set on the model for the job (A1111's `refiner_checkpoint`); the last
        one used stays loaded for the next job."""
        if refiner is None:
            yield
            return
        title, switch = refiner
        entry = self.models.find(title)
        if entry is None:
            raise KilnError(f"refiner_checkpoint: unknown model {title!r}; GET /sdapi/v1/sd-models lists them")
        if self._refiner_pipe is None or self._refiner_pipe[0] != entry.path:
            self._refiner_pipe = None
            log.info("loading the refiner %s", entry.path)
            self._refiner_pipe = (entry.path, self._load(str(entry.path), device=self.device,
                                                         precision=self.precision, **self.load_options))
        pipe = self.pipe
        pipe.set_refiner(self._refiner_pipe[1], switch)
        try:
            yield
        finally:
            pipe.set_refiner(None)

    def _watch(self, job: Job, pipe, params: dict, fraction):
        """The step callback (progress as `fraction(part of this generation done)` says, cancel, skip) and
        previews for a generation with `params`; returns the hook keywords and a reset for the next one."""
        phases = 2 if params.get("hires_scale") else 1
        state = {"phase": 0, "last": -1}

        def on_step(i, total, x, pred_x0):
            if i <= state["last"]:
                state["phase"] += 1
            state["last"] = i
            job.step += 1
            job.sampling_step, job.sampling_steps = i + 1, total
            job.progress = min(0.999, fraction((state["phase"] + (i + 1) / total) / phases))
            job.version += 1
            self.observer.step(job)
            if job.cancel_event.is_set():
                raise Interrupted
            if job.skip_event.is_set():
                raise Skipped

        def on_preview(i, total, images, seeds):
            job.preview = png_bytes(images[0])
            job.preview_step = job.step
            job.version += 1

        w, h = params.get("width") or pipe.native_size, params.get("height") or pipe.native_size
        lat = w * h // pipe.cfg.downscale ** 2
        hooks = dict(callback=on_step, preview_every=self.preview_every, on_preview=on_preview,
                     preview_full=lat <= 32 * 32,  # small latents: the real decoder is cheap enough per step
                     preview_share=PREVIEW_SHARE)
        return hooks, lambda: state.update(phase=0, last=-1)

    def _generate(self, job: Job):
        if job.script is not None:
            return self._run_script(job)
        pipe = self.pipe
        kw = dict(job.params)
        kw.pop("refiner", None)  # set on the model by `_run`
        mode = job.mode
        n_iter, batch_size, seed = kw.pop("n_iter"), kw["batch_size"], kw.pop("seed")
        prompt = kw.pop("prompt")
        init = kw.pop("init_image", None)
        common, reset = self._watch(job, pipe, kw, lambda frac: (job.batch_no + frac) / n_iter)
        for k in range(n_iter):
            job.batch_no = k
            reset()
            job.skip_event.clear()
            args = dict(kw, seed=seed + k * batch_size, n_iter=1, **common)
            try:
                results = (pipe.txt2img_iter(prompt, **args) if mode == "txt2img"
                           else pipe.img2img_iter(prompt, init, **args))
                for result in results:
                    self._collect(job, result)
            except Skipped:
                continue
            except Interrupted:
                break
        self._log_notices(job, pipe)

    def _log_notices(self, job: Job, pipe):
        for note in dict.fromkeys(pipe.notices + job.notices):
            log.info("%s", note)
        pipe.notices.clear()

    def _run_script(self, job: Job):
        """An A1111 script: its generations in turn (a checkpoint it names loaded for them, the job's model put
        back after), then its grids and images in A1111's order. A skip stops a script as an interrupt does."""
        from ..pipeline import Hooks
        from ..scripts import Runner, run

        first = self.entry

        def load_model(name):
            entry = self.models.find(name)
            if entry is None:
                raise KilnError(f"unknown checkpoint {name!r}; GET /sdapi/v1/sd-models lists them")
            self._switch(entry)
            return self.pipe

        def on_run(i, n):
            job.batch_no = i
            reset()

        runner = Runner(self.pipe, None, load_model, on_run)
        common, reset = self._watch(job, self.pipe, job.params, lambda frac: (runner.done + frac) / runner.total)
        runner.hooks = Hooks(**common)
        try:
            output = run(job.script, runner)
        except Skipped:
            raise Interrupted from None
        finally:
            if self.entry is not first:
                self._switch(first)
        for result in output.results:
            self._collect(job, result)
        job.grids = output.grids
        self._log_notices(job, runner.pipe)

    def _collect(self, job: Job, result):
        out = None
        if job.save and self.outdir and not job.persist:  # persisted jobs save when they end (history.JobLog)
            from ..output import OutputDir
            from ..output.pnginfo import encode_image, pnginfo_for

            out = OutputDir(self.outdir)
        for pixels, text, seed, prompt, flagged in itertools.zip_longest(
                result.pixels, result.infotexts, result.seeds, result.prompts, result.flagged):
            image = Image.fromarray(np.ascontiguousarray(pixels))
            job.images.append(png_bytes(image, text))
            job.infotexts.append(text)
            job.seeds.append(seed)
            job.prompts.append(prompt)
            job.flagged.append(bool(flagged))
            if job.save and job.persist:
                job.pending.append((image, text))
            if out is not None:
                fmt, quality = job.save_as
                path = (out.save_sample(image, pnginfo_for("a1111", text, {})) if fmt == "png" else
                        out.save_sample(image, encoded=encode_image(image, fmt, quality, text)))
                job.files.append(str(path.relative_to(out.root)))
        job.result_params = result.params
        job.notices = result.notices  # all of the request's so far
        job.version += 1
