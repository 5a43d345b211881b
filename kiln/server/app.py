"""`kiln serve`: AUTOMATIC1111's `/sdapi/v1` API (`a1111`), kiln's job API `/api/v1` (`jobs`) and the web UI
(`webui`), on one worker queue.

Every endpoint but the UI's static files needs credentials when `--api-auth`/`--token` are set.
"""
from __future__ import annotations

import time

from fastapi import FastAPI, Request

from .. import __version__
from . import a1111, controlnet, extras, jobs, webui
from .context import RequestError, Server, ServerConfig, authorized, error_response, parse_api_auth
from .worker import ModelIndex, QueueFull, Worker

PUBLIC = ("/", "/favicon.ico")  # with /static/*: the UI's files, served without credentials


def make_worker(config: ServerConfig) -> Worker:
    """The model worker (loads the first model now): `--ckpt`, else the first checkpoint found, else the demo."""
    from ..demo.report import EMBEDDED

    models = ModelIndex.scan(config.ckpt, config.ckpt_dir)
    first = config.ckpt or (models.entries[0].path if models.entries else EMBEDDED)
    return Worker(models, str(first), config.limits, device=config.device, precision=config.precision,
                  outdir=config.outdir, preview_every=config.preview_every, safety_checker=config.safety_checker,
                  lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir,
                  decoders=(config.vae_approx_dir, config.preview_decoder),
                  load_options={k: v for k, v in (("offload", config.offload), ("prepack", config.prepack))
                                if v != ServerConfig.__dataclass_fields__[k].default})


def create_app(config: ServerConfig, worker: Worker | None = None) -> FastAPI:
    """The ASGI app. The worker (model + queue) starts here unless one is given."""
    from ..styles import read_styles

    styles = read_styles(config.styles_file)  # before the model loads: a bad file is a quick one-line error
    worker = worker or make_worker(config)
    app = FastAPI(title="kiln", version=__version__,
                  description="Stable Diffusion: AUTOMATIC1111-compatible API (/sdapi/v1), job API (/api/v1), web UI.")
    app.state.worker, app.state.config = worker, config
    app.state.server = Server(config, worker, styles, controlnet.ControlNetIndex.for_config(config.controlnet_dir))
    limits, protected = config.limits, bool(config.api_auth or config.token)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if protected and not (path in PUBLIC or path.startswith("/static/")) and not authorized(request, config):
            challenge = 'Basic realm="kiln"' if config.api_auth else 'Bearer realm="kiln"'
            return error_response(401, "Not authenticated", "HTTPException", {"WWW-Authenticate": challenge})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return error_response(413, f"request body larger than {limits.max_body_bytes} bytes", "HTTPException")
        start = time.time()
        response = await call_next(request)
        response.headers["X-Process-Time"] = f"{time.time() - start:.4f}"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error_response(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_response(503, "the queue is full; retry later", "QueueFull", {"Retry-After": str(exc.retry_after)})

    app.include_router(a1111.router)
    app.include_router(extras.router)
    app.include_router(jobs.router)
    app.include_router(controlnet.router)
    webui.mount(app)
    return app


__all__ = ["ServerConfig", "create_app", "make_worker", "parse_api_auth"]
