"""`kiln serve`: AUTOMATIC1111's `/sdapi/v1` API, kiln's job API (`/api/v1`) and the web UI, on one worker queue.

Every endpoint but the UI's static files needs credentials when `--api-auth`/`--token` are set.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..samplers import SAMPLER_LIST, SCHEDULES, resolve
from ..samplers.schedules import SCHEDULE_LABELS
from .schemas import (Img2ImgRequest, PngInfoRequest, RequestError, Txt2ImgRequest, decode_image, echo_parameters,
                      info_json, to_job)
from .worker import FINAL, Job, Limits, ModelIndex, QueueFull, Worker

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC = ("/", "/favicon.ico")  # with /static/*: the UI's files, served without credentials


@dataclass
class ServerConfig:
    ckpt: str | None = None
    ckpt_dir: str | None = None
    outdir: str | None = "outputs/serve"
    save: bool = True  # native API / web UI results saved to outdir (A1111 requests: their save_images)
    device: str = "auto"
    precision: str = "full"
    offload: str | None = None  # "medvram" | "lowvram" (GPU)
    prepack: bool | str = "auto"  # CPU: oneDNN pre-packed convolution weights (kiln.models.conv)
    limits: Limits = field(default_factory=Limits)
    api_auth: list = field(default_factory=list)  # [(user, password), ...]
    token: str | None = None
    preview_every: int = 1
    safety_checker: str | None = None
    lora_dir: str | None = None  # <lora:name:weight> tags in prompts are looked up here
    embeddings_dir: str | None = None  # textual-inversion files, used in prompts by file name


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


def _error(status: int, message: str, kind: str = "RequestError", headers=None) -> JSONResponse:
    # A1111's error shape, plus FastAPI's "detail"
    return JSONResponse({"error": kind, "detail": message, "body": None, "errors": message}, status_code=status,
                        headers=headers)


def _authorized(request: Request, config: ServerConfig) -> bool:
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


def make_worker(config: ServerConfig) -> Worker:
    """The model worker (loads the first model now): `--ckpt`, else the first checkpoint found, else the demo."""
    from ..demo.report import EMBEDDED

    models = ModelIndex(config.ckpt, config.ckpt_dir)
    first = config.ckpt or (models.entries[0].path if models.entries else EMBEDDED)
    return Worker(models, str(first), config.limits, device=config.device, precision=config.precision,
                  outdir=config.outdir, preview_every=config.preview_every, safety_checker=config.safety_checker,
                  lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir,
                  load_options={k: v for k, v in (("offload", config.offload), ("prepack", config.prepack))
                                if v != ServerConfig.__dataclass_fields__[k].default})


def create_app(config: ServerConfig, worker: Worker | None = None) -> FastAPI:
    """The ASGI app. The worker (model + queue) starts here unless one is given."""
    limits = config.limits
    worker = worker or make_worker(config)
    models = worker.models
    app = FastAPI(title="kiln", version=__version__,
                  description="Stable Diffusion: AUTOMATIC1111-compatible API (/sdapi/v1), job API (/api/v1), web UI.")
    app.state.worker = worker
    app.state.config = config
    protected = bool(config.api_auth or config.token)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if protected and not (path in PUBLIC or path.startswith("/static/")) and not _authorized(request, config):
            challenge = 'Basic realm="kiln"' if config.api_auth else 'Bearer realm="kiln"'
            return _error(401, "Not authenticated", "HTTPException", {"WWW-Authenticate": challenge})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _error(413, f"request body larger than {limits.max_body_bytes} bytes", "HTTPException")
        start = time.time()
        response = await call_next(request)
        response.headers["X-Process-Time"] = f"{time.time() - start:.4f}"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return _error(503, "the queue is full; retry later", "QueueFull", {"Retry-After": str(exc.retry_after)})

    def submit(req, mode, native=False) -> Job:
        job = to_job(req, mode, limits, worker.pipe, worker.options, models)
        job.save = job.save or (native and config.save)
        return worker.submit(job)

    # ------------------------------------------------------------------ A1111
    a = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    def run_blocking(req, mode):
        job = submit(req, mode)
        job.done_event.wait()
        if job.state == "failed":
            raise RequestError(job.error, 422 if job.user_error else 500)
        if job.state == "cancelled":
            raise RequestError("the job was cancelled before it started", 409)
        images = [base64.b64encode(b).decode("ascii") for b in job.images] if req.send_images is not False else []
        return {"images": images, "parameters": echo_parameters(req),
                "info": json.dumps(info_json(job, req, worker.pipe, job.model_title), ensure_ascii=False)}

    @a.post("/txt2img")
    def txt2img(req: Txt2ImgRequest):
        return run_blocking(req, "txt2img")

    @a.post("/img2img")
    def img2img(req: Img2ImgRequest):
        return run_blocking(req, "img2img")

    @a.get("/progress")
    def progress(skip_current_image: bool = False):
        job = worker.current
        queued = len(worker.queue)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                              "queued": queued}}
        image = None
        if not skip_current_image and job.preview is not None:
            image = base64.b64encode(job.preview).decode("ascii")
        return {"progress": job.progress, "eta_relative": job.eta() or 0.0, "current_image": image,
                "textinfo": f"{job.mode} {job.id}",
                "state": {"skipped": job.skip_event.is_set(), "interrupted": job.cancel_event.is_set(),
                          "job": job.id, "job_count": job.params.get("n_iter", 1),
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                          "job_no": job.batch_no, "sampling_step": job.sampling_step,
                          "sampling_steps": job.sampling_steps, "queued": queued}}

    @a.post("/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @a.post("/skip")
    def skip():
        worker.skip()
        return {}

    def current_options():
        return {**worker.options, "sd_model_checkpoint": worker.model_title,
                "sd_checkpoint_hash": worker.entry.sha256}

    @a.get("/options")
    def get_options():
        return current_options()

    @a.post("/options")
    def set_options(body: dict = Body(...)):
        if "CLIP_stop_at_last_layers" in body:
            v = body["CLIP_stop_at_last_layers"]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= worker.pipe.cfg.text.layers:
                raise RequestError(f"CLIP_stop_at_last_layers must be an integer from 1 to "
                                   f"{worker.pipe.cfg.text.layers}")
        if "return_grid" in body and body["return_grid"]:
            raise RequestError("return_grid is not supported: responses hold the images only")
        model = body.get("sd_model_checkpoint")
        if model is not None:
            if not isinstance(model, str) or models.find(model) is None:
                raise RequestError(f"unknown model {model!r}; GET /sdapi/v1/sd-models lists them", 404)
        for k, v in body.items():  # A1111 keeps unknown keys out too; nothing here names a path
            if k in worker.options and k != "sd_model_checkpoint":
                worker.options[k] = v
        if model is not None:
            job = worker.submit(Job("load", {}, model=model))
            job.done_event.wait()
            if job.state == "failed":
                raise RequestError(job.error, 422 if job.user_error else 500)
        return None

    def model_list():
        return [{"title": e.title, "model_name": e.name, "hash": e.short_hash, "sha256": e.sha256,
                 "filename": e.filename, "config": None} for e in models.entries]

    @a.get("/sd-models")
    def sd_models():
        return model_list()

    @a.post("/refresh-checkpoints")
    def refresh_checkpoints():
        models.refresh()
        return None

    @a.get("/samplers")
    def samplers():
        return [{"name": s.label, "aliases": [s.name, *s.aliases],
                 "options": {"scheduler": s.schedule} if s.kind == "denoise" else {}} for s in SAMPLER_LIST]

    @a.get("/schedulers")
    def schedulers():
        out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                "need_inner_model": False}]
        out += [{"name": k, "label": label, "aliases": None,  # quad: DDIM and PLMS only
                 "default_rho": 7.0 if k == "karras" else -1, "need_inner_model": False}
                for k, label in SCHEDULE_LABELS.items()]
        return out

    @a.get("/upscalers")
    def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for n in ("Latent", "Lanczos")]

    @a.get("/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": "Latent"}]

    @a.get("/sd-vae")
    def sd_vae():
        return []

    @a.get("/embeddings")
    def embeddings():
        """The textual-inversion embeddings prompts may use, as A1111 lists them (skipped: another width)."""
        from ..checkpoints.embeddings import read_embedding, scan
        from ..errors import CheckpointError

        loaded, skipped = {}, {}
        widths = worker.pipe.cfg.context_widths  # SDXL: an embedding needs vectors for both encoders
        for path in scan(config.embeddings_dir) if config.embeddings_dir else []:
            try:
                emb = read_embedding(path)
            except CheckpointError:
                continue
            ok = all(w in emb.vectors for w in widths)
            v = emb.vectors[widths[0]] if ok else next(iter(emb.vectors.values()))
            info = {"step": emb.step, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": widths[0] if ok else max(emb.vectors), "vectors": len(v)}
            (loaded if ok else skipped)[emb.name] = info
        return {"loaded": loaded, "skipped": skipped}

    @a.get("/loras")
    def loras():
        """The LoRA files prompts may name (`<lora:name:weight>`); paths relative to the LoRA folder."""
        from ..checkpoints.lora import LORA_SUFFIXES

        if not config.lora_dir or not Path(config.lora_dir).is_dir():
            return []
        root = Path(config.lora_dir).resolve()
        return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(root).as_posix(), "metadata": {}}
                for p in sorted(root.rglob("*")) if p.suffix in LORA_SUFFIXES and p.is_file()]

    @a.get("/prompt-styles")
    def prompt_styles():
        return []

    @a.post("/png-info")
    def png_info(req: PngInfoRequest):
        from ..postprocess.infotext import parse_infotext
        from ..postprocess.pnginfo import infotext_from_chunks

        if not req.image:
            raise RequestError("image: empty")
        im = decode_image(req.image, limits, "image")
        chunks = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
        text = infotext_from_chunks(chunks) or ""
        items = {k: v for k, v in chunks.items() if k != "parameters"}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @a.get("/memory")
    def memory():
        return memory_report()

    app.include_router(a)

    # ------------------------------------------------------------------ native job API
    n = APIRouter(prefix="/api/v1", tags=["kiln"])

    def job_or_404(job_id: str) -> Job:
        job = worker.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id!r} (finished jobs are kept for a while only)", 404)
        return job

    def job_status(job: Job) -> dict:
        st = job.status(worker.position(job))
        st["params"] = public_params(job)
        st["image_urls"] = [f"/api/v1/jobs/{job.id}/images/{i}" for i in range(len(job.images))]
        return st

    @n.post("/txt2img", status_code=202)
    def submit_txt2img(req: Txt2ImgRequest):
        return job_status(submit(req, "txt2img", native=True))

    @n.post("/img2img", status_code=202)
    def submit_img2img(req: Img2ImgRequest):
        return job_status(submit(req, "img2img", native=True))

    @n.get("/jobs")
    def list_jobs():
        return {"jobs": worker.listing(), "queue_size": limits.queue_size}

    @n.get("/jobs/{job_id}")
    def get_job(job_id: str):
        return job_status(job_or_404(job_id))

    @n.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        job = job_or_404(job_id)
        worker.cancel(job)
        return job_status(job)

    @n.delete("/jobs/{job_id}")
    def delete_job(job_id: str):
        return cancel_job(job_id)

    @n.get("/jobs/{job_id}/images/{index}", response_class=Response,
           responses={200: {"content": {"image/png": {}}}})
    def job_image(job_id: str, index: int):
        job = job_or_404(job_id)
        if not 0 <= index < len(job.images):
            raise RequestError(f"job {job_id} has {len(job.images)} images", 404)
        return Response(job.images[index], media_type="image/png")

    @n.get("/jobs/{job_id}/preview", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def job_preview(job_id: str):
        job = job_or_404(job_id)
        if job.preview is None:
            return Response(status_code=204)
        return Response(job.preview, media_type="image/png")

    @n.get("/jobs/{job_id}/events", response_class=StreamingResponse,
           responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str):
        """Server-sent events: `progress` (with a `preview` data URL when a new one exists), then one final
        event named after the end state (done, failed, cancelled, interrupted) carrying the job's status."""
        job = job_or_404(job_id)

        async def stream():
            last, last_preview, quiet = -1, -1, 0.0
            while True:
                version = job.version
                if version != last:
                    last, quiet = version, 0.0
                    st = job_status(job)
                    if job.preview is not None and job.preview_step != last_preview:
                        last_preview = job.preview_step
                        st["preview"] = "data:image/png;base64," + base64.b64encode(job.preview).decode("ascii")
                    final = st["state"] in FINAL
                    yield f"event: {st['state'] if final else 'progress'}\ndata: {json.dumps(st)}\n\n"
                    if final:
                        return
                elif quiet > 15:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.05)
                quiet += 0.05

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @n.get("/info")
    def info():
        pipe = worker.pipe
        return {"version": __version__, "model": worker.model_title, "native_size": pipe.native_size,
                "size_unit": max(8, pipe.cfg.downscale), "limits": {
                    "max_size": limits.max_size, "max_steps": limits.max_steps,
                    "max_batch_size": limits.max_batch_size, "max_n_iter": limits.max_n_iter,
                    "max_prompt_chars": limits.max_prompt_chars, "queue_size": limits.queue_size},
                "samplers": [{"name": s.name, "label": s.label,  # default schedules: the model's where it sets one
                              "schedule": resolve(s.name, defaults=pipe.cfg.sampler_schedules)[1]}
                             for s in SAMPLER_LIST],
                "schedules": [{"name": k, "label": label + (" (DDIM, PLMS)" if k not in SCHEDULES else "")}
                              for k, label in SCHEDULE_LABELS.items()],
                "models": model_list(), "inpainting": pipe.cfg.unet.in_channels != pipe.cfg.latent_channels}

    app.include_router(n)

    # ------------------------------------------------------------------ web UI
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=False), name="static")

    return app


def public_params(job: Job) -> dict:
    """A job's parameters without images (what the UI's "reuse parameters" fills in)."""
    out = {}
    for k, v in job.params.items():
        if k in ("init_image", "mask"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def memory_report() -> dict:
    import resource

    import torch

    ram = {}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "unavailable on this system"}
    ram["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    else:
        cuda = {"error": "no CUDA device"}
    return {"ram": ram, "cuda": cuda}
