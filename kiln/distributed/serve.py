"""`kiln serve --ray`: the same FastAPI app on Ray Serve, as an ingress deployment in front of a model deployment.

- **Model deployment** (`kiln-model`): each replica loads the model once and runs jobs on its own worker
  (`num_replicas` or autoscaling, `max_ongoing_requests` jobs at a time per replica, one GPU each when the
  cluster has GPUs). Its `run` method streams a job's progress (steps, previews) and then its result.
- **Ingress** (`kiln`): the unchanged `create_app` over a `RemoteWorker`, which keeps the queue, job ids, options
  and cancel exactly as the local worker does, but dispatches each job to the model deployment. It owns the job
  store (one ingress replica: `--data-dir`/`--outdir` on its node) and saves the job API's files itself. So the job API,
  SSE progress, `/sdapi/v1/progress` and the web UI work across replicas.

Cancelling a running job cancels its stream; the replica then cancels the job at its next step.
"""
from __future__ import annotations

import io
import time

from PIL import Image

from ..errors import KilnError
from ..pipeline.facts import ModelFacts
from ..server.worker import Interrupted, Job, ModelEntry, ModelIndex, Worker


def model_facts(worker: Worker) -> dict:
    """What the ingress needs to check requests and describe the model, as plain data: the loaded model's
    `ModelFacts`, its title and hash, and the replica's model index."""
    return {"title": worker.model_title, "sha256": worker.entry.sha256, "facts": worker.facts.to_dict(),
            "models": worker.models.records()}


class ModelServer:
    """The model deployment's body: a local worker; `run` streams one job."""

    def __init__(self, config):
        import ray
        import torch

        from ..server.app import make_worker

        # as many threads as the replica was given CPUs: predictable speed, and the same kernels' summation order
        # on every replica (so every replica renders the same pixels)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.worker = make_worker(config)

    def facts(self) -> dict:
        return model_facts(self.worker)

    def refresh(self) -> dict:
        self.worker.models.refresh()
        return model_facts(self.worker)

    def run(self, mode: str, params: dict, model: str | None, save: bool, save_as: tuple = ("png", 80),
            script=None):
        job = self.worker.submit(Job(mode, params, model=model, save=save, save_as=tuple(save_as), script=script))
        try:
            seen, preview = -1, -1
            while not job.done_event.wait(0.05):
                if job.version != seen:
                    seen = job.version
                    update = {"progress": job.progress, "step": job.step, "batch_no": job.batch_no,
                              "sampling_step": job.sampling_step, "sampling_steps": job.sampling_steps}
                    if job.preview is not None and job.preview_step != preview:
                        preview = job.preview_step
                        update["preview"], update["preview_step"] = job.preview, job.preview_step
                    yield update
            yield {"final": True, "state": job.state, "error": job.error, "user_error": job.user_error,
                   "images": job.images, "infotexts": job.infotexts, "seeds": job.seeds, "prompts": job.prompts,
                   "files": job.files, "flagged": job.flagged, "result_params": job.result_params,
                   "model_title": job.model_title, "step": job.step, "grids": job.grids,
                   "facts": model_facts(self.worker)}
        finally:
            if not job.done_event.is_set():  # the ingress cancelled the stream
                self.worker.cancel(job)


class RemoteWorker(Worker):
    """The local worker's queue, ids, options and cancel; the work itself runs on the model deployment."""

    def __init__(self, handle, limits, facts: dict, *, dispatchers: int = 4):
        self.handle = handle
        self.limits = limits
        self._init_queue()
        self.models = ModelIndex(refresher=lambda: self._refreshed())
        self._apply(facts)
        self.start_threads(dispatchers)

    def _refreshed(self):
        return ModelIndex.from_records(self.handle.refresh.remote().result()["models"]).entries

    def _apply(self, facts: dict):
        """The replicas' model, as their facts say: the same index (and lookups by name and hash) as locally."""
        self.facts = ModelFacts.from_dict(facts["facts"])
        self.models.entries = ModelIndex.from_records(facts["models"]).entries
        self.entry = self.models.find(facts["title"]) or ModelEntry("", facts["title"], facts["title"],
                                                                    facts["sha256"])

    @property
    def model_title(self) -> str:
        return self.entry.title

    def _run(self, job: Job):
        # every replica renders with the model chosen here (options / override_settings)
        model = job.model or self.model_title
        # the job API's jobs are saved here, by the ingress, which owns the job store (`history.JobLog`)
        save = job.save and not job.persist
        stream = self.handle.options(stream=True).run.remote(job.mode, job.params, model, save, job.save_as,
                                                             job.script)
        final = None
        for update in stream:
            if job.cancel_event.is_set():
                stream.cancel()
                raise Interrupted
            if update.get("final"):
                final = update
                break
            for k in ("progress", "step", "batch_no", "sampling_step", "sampling_steps"):
                setattr(job, k, update[k])
            if "preview" in update:
                job.preview, job.preview_step = update["preview"], update["preview_step"]
            job.version += 1
        if final is None:
            raise KilnError("the model deployment ended the job without a result")
        for k in ("images", "infotexts", "seeds", "prompts", "files", "flagged", "result_params", "model_title",
                  "step", "grids"):
            setattr(job, k, final[k])
        if job.save and job.persist:
            job.pending = [(Image.open(io.BytesIO(png)), text) for png, text in zip(job.images, job.infotexts)]
        if job.mode == "load":
            self._apply(final["facts"])
        if final["state"] == "failed":
            if final["user_error"]:
                raise KilnError(final["error"])
            raise RuntimeError(final["error"])
        if final["state"] in ("interrupted", "cancelled"):
            raise Interrupted


def build_app(config, *, num_replicas: int | None = 1, min_replicas: int | None = None,
              max_replicas: int | None = None, max_ongoing_requests: int = 1, num_gpus: float = 0,
              num_cpus: float = 1, dispatchers: int | None = None):
    """A bound Ray Serve application: the `kiln` ingress (FastAPI) over the `kiln-model` deployment."""
    from ray import serve

    model_options = dict(name="kiln-model", max_ongoing_requests=max_ongoing_requests,
                         ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max(lo, max_replicas or lo)
        model_options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                               "target_ongoing_requests": max(1, max_ongoing_requests)}
        capacity = hi * max_ongoing_requests
    else:
        model_options["num_replicas"] = num_replicas or 1
        capacity = (num_replicas or 1) * max_ongoing_requests
    model = serve.deployment(ModelServer, **model_options).bind(config)

    class Ingress:
        def __init__(self, handle):
            self.handle = handle

        async def __serve_build_asgi_app__(self):
            from ..server import create_app

            facts = await self.handle.facts.remote()
            worker = RemoteWorker(self.handle, config.limits, facts, dispatchers=dispatchers or capacity)
            return create_app(config, worker=worker)

    ingress = serve.deployment(serve.ingress()(Ingress), name="kiln", num_replicas=1,
                               max_ongoing_requests=max(64, config.limits.queue_size * 4),
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(model)


def run(config, *, host: str, port: int, address: str | None = None, blocking: bool = True, **deploy):
    """Start (or join) a Ray cluster, start Serve's HTTP proxy on host:port and deploy kiln at `/`."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KilnError("--ray needs Ray Serve: pip install 'ray[data,serve]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    deploy.setdefault("num_gpus", 1 if gpus else 0)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(config, **deploy), name="kiln", route_prefix="/", blocking=blocking)
    while blocking:  # serve.run(blocking=True) returns on Ctrl+C in some Ray versions
        time.sleep(3600)
    return handle
