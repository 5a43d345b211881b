"""kiln's own job API, `/api/v1`: submit, then follow a job by id (status, server-sent events, previews,
images), cancel it; and what the web UI needs to know about the model and the server's limits."""
from __future__ import annotations

import asyncio
import base64
import json
import os

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..samplers import SAMPLER_LIST, SCHEDULES, resolve
from ..samplers.schedules import SCHEDULE_LABELS
from .context import RequestError, Server, server
from .schemas import Img2ImgRequest, Txt2ImgRequest
from .store import STATES
from .worker import FINAL, Job

router = APIRouter(prefix="/api/v1", tags=["kiln"])
PNG = {200: {"content": {"image/png": {}}}}


def job_status(s: Server, job: Job) -> dict:
    st = job.status(s.worker.position(job))
    st["params"] = public_params(job)
    st["image_urls"] = [f"/api/v1/jobs/{job.id}/images/{i}" for i in range(len(job.images))]
    return st


def public_params(job: Job) -> dict:
    """A job's parameters without images (what the UI's "reuse parameters" fills in)."""
    from .controlnet import public_units

    out = {k: list(v) if isinstance(v, tuple) else v for k, v in job.params.items()
           if k not in ("init_image", "mask", "controlnets")}
    if job.params.get("controlnets"):
        out["controlnets"] = public_units(job.params["controlnets"])
    return out


@router.post("/txt2img", status_code=202)
def submit_txt2img(req: Txt2ImgRequest, s: Server = Depends(server)):
    return job_status(s, s.submit(req, "txt2img", native=True))


@router.post("/img2img", status_code=202)
def submit_img2img(req: Img2ImgRequest, s: Server = Depends(server)):
    return job_status(s, s.submit(req, "img2img", native=True))


@router.get("/jobs")
def list_jobs(state: Literal[STATES] | None = None, limit: int = Query(20, ge=1, le=100),
              before: str | None = Query(None, max_length=64), s: Server = Depends(server)):
    """The job API's jobs, newest first: `limit` of them (1–100), only those in `state`, submitted before the job
    `before` (the previous page's `next`). `queue`: the running job and the queue, in order."""
    store = s.worker.history.store
    if before is not None and store.get(before) is None:
        raise RequestError(f"before: no job {before!r}")
    records, more = store.list(state, limit, before)
    jobs = [stored_status(s, r) for r in records]
    return {"jobs": jobs, "next": jobs[-1]["id"] if more else None, "queue": s.worker.listing(),
            "queue_size": s.limits.queue_size}


def stored_status(s: Server, rec: dict) -> dict:
    """A stored job's status: the live job's while the worker holds it, else the record's (images counted)."""
    from .history import job_of

    live = s.worker.jobs.get(rec["id"])
    if live is not None:
        return job_status(s, live)
    st = job_status(s, job_of(rec, []))
    st["images"] = n = rec.get("image_count", 0)
    st["image_urls"] = [f"/api/v1/jobs/{rec['id']}/images/{i}" for i in range(n)]
    return st


@router.get("/jobs/{job_id}")
def get_job(job_id: str, s: Server = Depends(server)):
    return job_status(s, s.job(job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, s: Server = Depends(server)):
    job = s.job(job_id)
    s.worker.cancel(job)
    return job_status(s, job)


@router.delete("/jobs/{job_id}")
def delete_job(job_id: str, s: Server = Depends(server)):
    """Cancel the job if it has not ended, and delete it: its record, images and saved files (a running one's
    when it stops, at its next step)."""
    job = s.job(job_id)
    s.worker.delete(job)
    return dict(job_status(s, job), deleted=True)


@router.get("/jobs/{job_id}/images/{index}", response_class=Response, responses=PNG)
def job_image(job_id: str, index: int, s: Server = Depends(server)):
    job = s.job(job_id)
    if not 0 <= index < len(job.images):
        raise RequestError(f"job {job_id} has {len(job.images)} images", 404)
    return Response(job.images[index], media_type="image/png")


@router.get("/jobs/{job_id}/preview", response_class=Response, responses=PNG)
def job_preview(job_id: str, s: Server = Depends(server)):
    job = s.job(job_id)
    if job.preview is None:
        return Response(status_code=204)
    return Response(job.preview, media_type="image/png")


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, s: Server = Depends(server)):
    """Server-sent events: `progress` (with a `preview` data URL when a new one exists), then one final
    event named after the end state (done, failed, cancelled, interrupted) carrying the job's status."""
    job = s.job(job_id)
    return StreamingResponse(_events(s, job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(s: Server, job: Job):
    last, last_preview, quiet = -1, -1, 0.0
    while True:
        version = job.version
        if version != last:
            last, quiet = version, 0.0
            st = job_status(s, job)
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


@router.get("/info")
def info(s: Server = Depends(server)):
    from .a1111 import model_list

    facts, limits = s.facts, s.limits
    return {"version": __version__, "model": s.worker.model_title, "native_size": facts.native_size,
            "size_unit": facts.size_unit, "limits": {
                "max_size": limits.max_size, "max_steps": limits.max_steps,
                "max_batch_size": limits.max_batch_size, "max_n_iter": limits.max_n_iter,
                "max_prompt_chars": limits.max_prompt_chars, "queue_size": limits.queue_size},
            "samplers": [{"name": x.name, "label": x.label,  # default schedules: the model's where it sets one
                          "schedule": resolve(x.name, defaults=facts.sampler_schedules)[1]}
                         for x in SAMPLER_LIST],
            "schedules": [{"name": k, "label": label + (" (DDIM, PLMS)" if k not in SCHEDULES else "")}
                          for k, label in SCHEDULE_LABELS.items()],
            "models": model_list(s), "inpainting": facts.inpainting}


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
