"""Operations: liveness and readiness probes for orchestrators, Prometheus metrics, and the answer to a client
over its API key's limit of queued jobs (429 with Retry-After)."""
from __future__ import annotations

import math
import threading
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .clients import KeyLimit
from .context import Server, error_for, server
from .worker import FINAL, Job, Observer, Worker

router = APIRouter(tags=["operations"])
PROBES = ("/healthz", "/readyz")  # answered without credentials: probes of load balancers send none
STATES = ("queued", "running", *FINAL)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@router.get("/healthz")
def healthz():
    """Liveness: the process answers HTTP. Nothing else is checked."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready: `reasons` says why"}})
def readyz(s: Server = Depends(server)):
    """Readiness: a model is loaded and the worker takes jobs (503 while it is not, with the reasons)."""
    reasons = not_ready(s.worker)
    if reasons:
        return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
    return {"status": "ready", "model": s.worker.model_title}


def not_ready(worker: Worker) -> list[str]:
    reasons = []
    if getattr(worker, "entry", None) is None:  # None before the first load ends, and while a model switch runs
        reasons.append("no model loaded")
    if worker._stopping:
        reasons.append("the server is shutting down")
    if not any(t.is_alive() for t in getattr(worker, "threads", ())):
        reasons.append("the worker thread is not running")
    return reasons


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus' text format"}})
def metrics(s: Server = Depends(server)):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(metrics_of(s.worker).registry), media_type=CONTENT_TYPE_LATEST)


class Metrics(Observer):
    """The worker's metrics, in a registry of its own (several apps, in tests, each have a worker): histograms
    and counters fed by the worker as jobs run, gauges read from its state when scraped."""

    def __init__(self, worker: Worker):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()  # _WorkerState is read when scraped, never when registered
        self.step_seconds = Histogram("kiln_step_duration_seconds", "Time of one sampler step (from the previous "
                                      "step of the same sampling loop)", buckets=STEP_BUCKETS, registry=r)
        self.job_seconds = Histogram("kiln_job_duration_seconds", "Running time of the jobs that ran (model "
                                     "switch, sampling, decoding, saving)", buckets=JOB_BUCKETS, registry=r)
        self.wait_seconds = Histogram("kiln_job_wait_seconds", "Time jobs waited in the queue before they started",
                                      buckets=JOB_BUCKETS, registry=r)
        self.finished = Counter("kiln_jobs_finished", "Jobs that ended, by end state", ["state"], registry=r)
        self.images = Counter("kiln_images", "Images made (every image of every job, grids included)", registry=r)
        r.register(_WorkerState(worker))
        self._last: dict[str, float] = {}  # job id -> when its previous step ended
        self._lock = threading.Lock()

    def step(self, job: Job):
        now = time.perf_counter()
        with self._lock:
            previous = self._last.get(job.id)
            self._last[job.id] = now
        # a sampling loop's first step also holds the prompt's encoding (and, between batches, the decoding)
        if previous is not None and job.sampling_step > 1:
            self.step_seconds.observe(now - previous)

    def job_finished(self, job: Job):
        with self._lock:
            self._last.pop(job.id, None)
        self.finished.labels(job.state).inc()
        if job.started is not None:
            self.wait_seconds.observe(max(0.0, job.started - job.created))
            if job.finished is not None:
                self.job_seconds.observe(max(0.0, job.finished - job.started))
        if job.images:
            self.images.inc(len(job.images))


class _WorkerState:
    """Gauges read from the worker when scraped: queue depth, jobs by state, waiting jobs per client, the
    model's load time."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        w = self.worker
        with w.cv:
            depth = len(w.queue)
            states = [j.state for j in w.jobs.values()]
            waiting = w.queue.waiting() if hasattr(w.queue, "waiting") else {}
        yield GaugeMetricFamily("kiln_queue_depth", "Jobs waiting in the queue", value=depth)
        jobs = GaugeMetricFamily("kiln_jobs", "Jobs the server holds, by state (finished ones: the most recent)",
                                 labels=["state"])
        for state in STATES:
            jobs.add_metric([state], states.count(state))
        yield jobs
        per_client = GaugeMetricFamily("kiln_client_queued_jobs", "Jobs waiting per client (API key name; \"\" "
                                       "for requests without credentials)", labels=["client"])
        for client, n in sorted(waiting.items()):
            per_client.add_metric([client], n)
        yield per_client
        if getattr(w, "load_seconds", None) is not None:
            yield GaugeMetricFamily("kiln_model_load_seconds", "Time the loaded model took to load (with its hash "
                                    "and the safety checker)", value=w.load_seconds)


def metrics_of(worker: Worker) -> Metrics:
    if not isinstance(getattr(worker, "observer", None), Metrics):
        worker.observer = Metrics(worker)
    return worker.observer


def install(app: FastAPI):
    """The routes, the worker's metrics, and the 429 of a key over its limit."""
    metrics_of(app.state.worker)
    app.include_router(router)

    @app.exception_handler(KeyLimit)
    async def key_limit(request: Request, exc: KeyLimit):
        # this client's next job starts after the running one and the `ahead` jobs of other clients before it
        retry = max(1, math.ceil(app.state.worker.job_seconds() * (exc.ahead + 1)))
        return error_for(request, 429, str(exc), "KeyLimit", {"Retry-After": str(retry)})
