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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import KilnError
from ..output import png_bytes
from ..pipeline.facts import ModelFacts

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
    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
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




@dataclass
class ModelEntry:
    """A checkpoint a client may ask for: plain data, the same in the local server and across Ray."""
    path: str
    filename: str
    name: str
    sha256: str | None = None

    @classmethod
    def of(cls, path: Path) -> ModelEntry:
        return cls(str(path), path.name, path.stem if path.is_file() else path.name)

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.short_hash}]" if self.sha256 else self.filename

    def answers_to(self, name: str) -> bool:
        """A1111's ways to name a model: its title, file name or name, or its SHA-256 (whole, 10 or 8 digits)."""
        h = self.sha256
        return name in (self.title, self.filename, self.name) or bool(h) and name.lower() in (h, h[:10], h[:8])


SMALL_FILE = 256 * 1024 * 1024  # hashed when listed; bigger files are hashed when loaded (as A1111 does)


class ModelIndex:
    """The checkpoints a client may choose from, by title, file name, name or hash: never by path. The same index
    serves the local worker (`scan`) and the Ray Serve ingress (`from_records`, the replicas' index)."""

    def __init__(self, entries=(), refresher=None):
        self.entries: list[ModelEntry] = list(entries)
        self._refresher = refresher  # () -> the entries found now

    @classmethod
    def scan(cls, ckpt: str | None, ckpt_dir: str | None) -> ModelIndex:
        index = cls(refresher=lambda: _scan(ckpt, ckpt_dir, index.entries))
        index.refresh()
        return index

    @classmethod
    def from_records(cls, records: list[dict], refresher=None) -> ModelIndex:
        return cls([ModelEntry(**r) for r in records], refresher)

    def records(self) -> list[dict]:
        return [asdict(e) for e in self.entries]

    def refresh(self):
        if self._refresher is not None:
            self.entries = self._refresher()

    def find(self, name: str) -> ModelEntry | None:
        name = (name or "").strip()
        return next((e for e in self.entries if e.answers_to(name)), None)

    def entry_for(self, path) -> ModelEntry:
        path = str(Path(path).resolve())
        for e in self.entries:
            if e.path == path:
                return e
        e = ModelEntry.of(Path(path))
        self.entries.insert(0, e)
        return e


def _scan(ckpt, ckpt_dir, known: list[ModelEntry]) -> list[ModelEntry]:
    """--ckpt, the checkpoints in --ckpt-dir, the embedded demo model; small files hashed now."""
    from ..checkpoints.hashes import full_sha256
    from ..demo.report import EMBEDDED

    found = [Path(ckpt).resolve()] if ckpt else []
    folder = Path(ckpt_dir).resolve() if ckpt_dir else None
    if folder is not None and folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix in (".safetensors", ".ckpt") and p.is_file() or (p / "model_index.json").is_file():
                found.append(p.resolve())
    if EMBEDDED.exists():
        found.append(EMBEDDED)
    old = {e.path: e for e in known}
    entries = []
    for p in dict.fromkeys(found):
        e = old.get(str(p)) or ModelEntry.of(p)
        if e.sha256 is None and p.is_file() and p.stat().st_size <= SMALL_FILE:
            e.sha256 = full_sha256(p)
        entries.append(e)
    return entries


class Worker:
    def __init__(self, models: ModelIndex, first_model: str, limits: Limits, *, device="auto", precision="auto",
                 outdir: str | None = None, preview_every: int = 1, safety_checker: str | None = None,
                 loader=None, lora_dir: str | None = None, embeddings_dir: str | None = None,
                 load_options: dict | None = None, decoders: tuple = (None, None)):
        from ..pipeline import load

        self.models = models
        self.limits = limits
        self.device, self.precision = device, precision
        self.outdir = outdir
        self.preview_every = preview_every
        self.safety_checker = safety_checker
        self.lora_dir = lora_dir
        self.embeddings_dir = embeddings_dir
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
        self.queue: deque[Job] = deque()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: list[Job] = []  # one job here; a Ray Serve ingress dispatches several at once
        from .options import defaults

        self.options = defaults()  # A1111's settings (options.py); "sd_model_checkpoint": the model jobs run on
        self._durations = deque(maxlen=20)
        self._stopping = False

    def start_threads(self, n: int):
        self.threads = [threading.Thread(target=self._loop, name=f"kiln-worker-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------------ model
    def _switch(self, entry: ModelEntry):
        if self.entry is not None and entry.path == self.entry.path:
            return
        log.info("loading %s", entry.path)
        pipe = self._load(str(entry.path), device=self.device, precision=self.precision, **self.load_options)
        if self.safety_checker:
            pipe.load_safety_checker(self.safety_checker)
        pipe.lora_dir, pipe.embeddings_dir = self.lora_dir, self.embeddings_dir
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
    def submit(self, job: Job) -> Job:
        with self.cv:
            if self._stopping:
                raise QueueFull(5)
            if len(self.queue) >= self.limits.queue_size:
                per_job = (sum(self._durations) / len(self._durations)) if self._durations else 5.0
                raise QueueFull(max(1, int(per_job * (len(self.queue) + 1) + 0.999)))
            self.queue.append(job)
            self.jobs[job.id] = job
            self._evict()
            self.cv.notify_all()
        return job

    def _evict(self):
        finished = [j for j in self.jobs.values() if j.state in FINAL]
        for j in finished[: max(0, len(finished) - self.limits.keep_jobs)]:
            del self.jobs[j.id]

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

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
                job.version += 1
                job.done_event.set()
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

    def stop(self):
        with self.cv:
            self._stopping = True
            for job in list(self.queue):
                self.cancel(job)
            for job in self.running:
                job.cancel_event.set()
            self.cv.notify_all()
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
            try:
                self._run(job)
                job.state = "interrupted" if job.cancel_event.is_set() else "done"
            except Interrupted:
                job.state = "interrupted"
            except KilnError as e:
                job.state, job.error, job.user_error = "failed", str(e), True
            except MemoryError:
                job.state, job.error = "failed", "out of memory: ask for fewer or smaller images"
            except Exception as e:  # a bug: keep serving, tell the client, log the traceback
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
            finally:
                with self.cv:
                    self.running.remove(job)
                    job.finished = time.time()
                    if job.state == "done":
                        job.progress = 1.0
                        self._durations.append(job.finished - job.started)
                    job.version += 1
                    job.done_event.set()

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
        if job.save and self.outdir:
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
            if out is not None:
                fmt, quality = job.save_as
                path = (out.save_sample(image, pnginfo_for("a1111", text, {})) if fmt == "png" else
                        out.save_sample(image, encoded=encode_image(image, fmt, quality, text)))
                job.files.append(str(path.relative_to(out.root)))
        job.result_params = result.params
        job.notices = result.notices  # all of the request's so far
        job.version += 1
