"""`kiln serve`: AUTOMATIC1111's `/sdapi/v1` API (`a1111`), kiln's job API `/api/v1` (`jobs`), OpenAI's images
API `/v1` (`openai_api`), health and metrics (`ops`) and the web UI (`webui`), on one worker queue.

Every endpoint but the UI's static files and the health probes needs credentials when `--api-auth`, `--token` or
`--api-keys` are set.
"""
from __future__ import annotations

import time

from fastapi import FastAPI, Request

from .. import __version__
from . import a1111, controlnet, extras, jobs, openai_api, ops, webui
from .clients import CLIENT
from .context import RequestError, Server, ServerConfig, error_for, identify, parse_api_auth
from .worker import ModelIndex, QueueFull, Worker

PUBLIC = ("/", "/favicon.ico", *ops.PROBES)  # with /static/*: the UI's files; and the health probes


def make_worker(config: ServerConfig) -> Worker:
    """The model worker (loads the first model now): `--ckpt`, else the first checkpoint found, else the demo."""
    from ..demo.report import EMBEDDED

    models = ModelIndex.scan(config.ckpt, config.ckpt_dir)
    first = config.ckpt or (models.entries[0].path if models.entries else EMBEDDED)
    return Worker(models, str(first), config.limits, device=config.device, precision=config.precision,
                  outdir=config.outdir, preview_every=config.preview_every, safety_checker=config.safety_checker,
                  lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir, upscalers=upscalers_for(config),
                  decoders=(config.vae_approx_dir, config.preview_decoder),
                  load_options={k: v for k, v in (("offload", config.offload), ("prepack", config.prepack))
                                if v != ServerConfig.__dataclass_fields__[k].default})


def upscalers_for(config: ServerConfig):
    """The upscalers of --upscaler-dir (and models/ESRGAN, …), their models run on the server's device."""
    from ..pipeline.upscalers import Upscalers

    return Upscalers(config.upscaler_dir, device=config.device, precision=config.precision)


def create_app(config: ServerConfig, worker: Worker | None = None) -> FastAPI:
    """The ASGI app. The worker (model + queue) starts here unless one is given."""
    from ..styles import read_styles

    styles = read_styles(config.styles_file)  # before the model loads: a bad file is a quick one-line error
    worker = worker or make_worker(config)
    # the job store (a Ray Serve ingress owns it too: `worker` is its RemoteWorker); none for a stand-in worker
    if isinstance(worker, Worker) and worker.history is None:
        from .history import JobLog

        worker.attach(JobLog.open(config.data_dir, config.outdir, config.keep_days, config.keep_jobs))
    app = FastAPI(title="kiln", version=__version__,
                  description="Stable Diffusion: AUTOMATIC1111-compatible API (/sdapi/v1), job API (/api/v1), web UI.")
    app.state.worker, app.state.config = worker, config
    app.state.server = Server(config, worker, styles, controlnet.index_for(config),
                              getattr(worker, "upscalers", None) or upscalers_for(config))  # a Ray ingress: its own
    limits, protected = config.limits, bool(config.api_auth or config.token or config.api_keys)
    if config.api_keys:  # a worker shared by several apps (tests) keeps the limits of the one with keys
        worker.queue.limits = {k.name: k.max_queued for k in config.api_keys if k.max_queued}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        who = identify(request, config) if protected else ""
        if who is None and not (path in PUBLIC or path.startswith("/static/")):
            challenge = 'Basic realm="kiln"' if config.api_auth else 'Bearer realm="kiln"'
            return error_for(request, 401, "Not authenticated", "HTTPException", {"WWW-Authenticate": challenge})
        CLIENT.set(who or "")  # the jobs this request makes queue in this client's lane
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return error_for(request, 413, f"request body larger than {limits.max_body_bytes} bytes",
                             "HTTPException")
        start = time.time()
        response = await call_next(request)
        response.headers["X-Process-Time"] = f"{time.time() - start:.4f}"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_for(request, exc.status, str(exc), param=exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_for(request, 503, str(exc), "QueueFull", {"Retry-After": str(exc.retry_after)})

    app.include_router(a1111.router)
    app.include_router(extras.router)
    app.include_router(jobs.router)
    app.include_router(controlnet.router)
    openai_api.install(app)
    ops.install(app)
    webui.mount(app)
    return app


__all__ = ["ServerConfig", "create_app", "make_worker", "parse_api_auth"]
