"""What every route reads: the server's configuration and its worker (model facts, queue, model index)."""
from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .worker import Job, Limits, Worker


@dataclass
class ServerConfig:
    ckpt: str | None = None
    ckpt_dir: str | None = None
    outdir: str | None = "outputs/serve"
    save: bool = True  # native API / web UI results saved to outdir (A1111 requests: their save_images)
    device: str = "auto"
    precision: str = "auto"
    offload: str | None = None  # "medvram" | "lowvram" (GPU)
    prepack: bool | str = "auto"  # CPU: oneDNN pre-packed convolution and linear weights (kiln.models.conv)
    limits: Limits = field(default_factory=Limits)
    api_auth: list = field(default_factory=list)  # [(user, password), ...]
    token: str | None = None
    api_keys: list = field(default_factory=list)  # [clients.ApiKey]: bearer keys with names and queue limits
    preview_every: int = 1
    safety_checker: str | None = None
    lora_dir: str | None = None  # <lora:name:weight> tags in prompts are looked up here
    embeddings_dir: str | None = None  # textual-inversion files, used in prompts by file name
    styles_file: str | None = None  # A1111's styles.csv: requests' `styles` are looked up here
    host: str | None = None  # where `kiln serve` listens (reported by /sdapi/v1/cmd-flags)
    port: int | None = None
    controlnet_dir: str | None = None  # ControlNet files (sd-webui-controlnet's units); None: models/ControlNet
    data_dir: str | None = None  # the job store's folder (jobs.sqlite3); None: outdir (neither: in memory)
    keep_days: float | None = None  # finished jobs (and their files) deleted after this many days
    keep_jobs: int | None = None  # … or beyond this many (None: all kept; a store in memory keeps 100)
    shutdown_timeout: float = 30.0  # SIGTERM/SIGINT: how long the running job may take to finish
    upscaler_dir: str | None = None  # model upscaler files (ESRGAN, …), besides models/ESRGAN and the like
    vae_approx_dir: str | None = None  # TAESD decoders (A1111's names); None: models/VAE-approx
    preview_decoder: str | None = None  # a TAESD decoder for live previews; None: the model's in vae_approx_dir


class RequestError(Exception):
    """A request the server cannot run: `status` 422 (bad value) or 404 (unknown sampler, as A1111)."""

    def __init__(self, message: str, status: int = 422, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param  # the request field it is about, where one is (OpenAI's error shape names it)


@dataclass
class Server:
    config: ServerConfig
    worker: Worker
    styles: Any = None  # kiln.styles.StyleTable, read from config.styles_file when the app is made
    controlnets: Any = None  # controlnet.ControlNetIndex of config.controlnet_dir
    upscalers: Any = None  # kiln.pipeline.upscalers.Upscalers: the extras API's and the hires fix's names

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def models(self):
        return self.worker.models

    @property
    def facts(self):
        return self.worker.facts

    def submit(self, req, mode: str, native: bool = False) -> Job:
        from .schemas import request_settings, to_job

        options = self.worker.options
        # the web UI and the job API save by the server's --no-save; A1111 requests by save_images
        job = to_job(req, mode, self.limits, self.facts, options, self.models, self.styles,
                     save_default=native and self.config.save, controlnets=self.controlnets,
                     upscalers=self.upscalers)
        if self.worker.get(job.id) is not None:
            raise RequestError(f"force_task_id {job.id!r} is already a job's id")
        self.worker.submit(job, persist=native)  # the job API's jobs go to the job store
        if req.override_settings and req.override_settings_restore_afterwards is False:
            # A1111 keeps such overrides as the server's settings
            options.update(request_settings(req, self.facts, options, self.models))
        return job

    def job(self, job_id: str) -> Job:
        job = self.worker.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id!r} (finished jobs are kept for a while only)", 404)
        return job


def server(request: Request) -> Server:
    """The dependency every route takes."""
    return request.app.state.server


def error_response(status: int, message: str, kind: str = "RequestError", headers=None) -> JSONResponse:
    # A1111's error shape, plus FastAPI's "detail"
    return JSONResponse({"error": kind, "detail": message, "body": None, "errors": message}, status_code=status,
                        headers=headers)


def error_for(request: Request, status: int, message: str, kind: str = "RequestError", headers=None,
              param: str | None = None) -> JSONResponse:
    """An error in the shape the route's clients read: OpenAI's under /v1/, A1111's elsewhere."""
    if request.url.path.startswith("/v1/"):
        from .openai_api import openai_error

        return openai_error(status, message, param, headers)
    return error_response(status, message, kind, headers)


def parse_api_auth(text: str | None) -> list:
    """`user:pass[,user2:pass2]` as A1111's --api-auth."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth wants user:password pairs separated by commas, got {item!r}")
        pairs.append((user, password))
    return pairs


def authorized(request: Request, config: ServerConfig) -> bool:
    return identify(request, config) is not None


def identify(request: Request, config: ServerConfig) -> str | None:
    """The client a request's credentials name (None: no valid credentials): an API key's name, a Basic user's
    name, "token" for --token. The fair queue gives each its own lane."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and (config.token or config.api_keys):
        given = value.strip().encode()
        who = None
        for k in config.api_keys:  # compare with every key: no early exit that times the match
            if secrets.compare_digest(given, k.key.encode()):
                who = k.name
        if config.token and secrets.compare_digest(given, config.token.encode()):
            who = "token"
        return who
    if config.api_auth and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        ok = False
        for u, p in config.api_auth:  # compare with every pair: no early exit that times the user name
            ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(),
                                                                                             p.encode())
        return user if ok else None
    return None
