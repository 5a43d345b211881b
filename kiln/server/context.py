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
    prepack: bool | str = "auto"  # CPU: oneDNN pre-packed convolution weights (kiln.models.conv)
    limits: Limits = field(default_factory=Limits)
    api_auth: list = field(default_factory=list)  # [(user, password), ...]
    token: str | None = None
    preview_every: int = 1
    safety_checker: str | None = None
    lora_dir: str | None = None  # <lora:name:weight> tags in prompts are looked up here
    embeddings_dir: str | None = None  # textual-inversion files, used in prompts by file name
    styles_file: str | None = None  # A1111's styles.csv: requests' `styles` are looked up here
    host: str | None = None  # where `kiln serve` listens (reported by /sdapi/v1/cmd-flags)
    port: int | None = None
    controlnet_dir: str | None = None  # ControlNet files (sd-webui-controlnet's units); None: models/ControlNet
    vae_approx_dir: str | None = None  # TAESD decoders (A1111's names); None: models/VAE-approx
    preview_decoder: str | None = None  # a TAESD decoder for live previews; None: the model's in vae_approx_dir


class RequestError(Exception):
    """A request the server cannot run: `status` 422 (bad value) or 404 (unknown sampler, as A1111)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Server:
    config: ServerConfig
    worker: Worker
    styles: Any = None  # kiln.styles.StyleTable, read from config.styles_file when the app is made
    controlnets: Any = None  # controlnet.ControlNetIndex of config.controlnet_dir

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
                     save_default=native and self.config.save, controlnets=self.controlnets)
        if self.worker.get(job.id) is not None:
            raise RequestError(f"force_task_id {job.id!r} is already a job's id")
        self.worker.submit(job)
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
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if config.token and scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip().encode(), config.token.encode())
    if config.api_auth and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok = False
        for u, p in config.api_auth:  # compare with every pair: no early exit that times the user name
            ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(),
                                                                                             p.encode())
        return ok
    return False
