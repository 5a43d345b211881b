"""AUTOMATIC1111's API, `/sdapi/v1`: the requests its clients send (webuiapi, painting-app plugins, scripts)."""
from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Body, Depends

from ..samplers import SAMPLER_LIST
from ..samplers.schedules import SCHEDULE_LABELS
from .context import RequestError, Server, server
from .schemas import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest, decode_image, echo_parameters, info_json
from .worker import Job

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


def run_blocking(s: Server, req, mode):
    job = s.submit(req, mode)
    job.done_event.wait()
    if job.state == "failed":
        raise RequestError(job.error, 422 if job.user_error else 500)
    if job.state == "cancelled":
        raise RequestError("the job was cancelled before it started", 409)
    images = [base64.b64encode(b).decode("ascii") for b in job.images] if req.send_images is not False else []
    return {"images": images, "parameters": echo_parameters(req),
            "info": json.dumps(info_json(job, req, s.facts, job.model_title), ensure_ascii=False)}


@router.post("/txt2img")
def txt2img(req: Txt2ImgRequest, s: Server = Depends(server)):
    return run_blocking(s, req, "txt2img")


@router.post("/img2img")
def img2img(req: Img2ImgRequest, s: Server = Depends(server)):
    return run_blocking(s, req, "img2img")


@router.get("/progress")
def progress(skip_current_image: bool = False, s: Server = Depends(server)):
    job, queued = s.worker.current, len(s.worker.queue)
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


@router.post("/interrupt")
def interrupt(s: Server = Depends(server)):
    s.worker.interrupt()
    return {}


@router.post("/skip")
def skip(s: Server = Depends(server)):
    s.worker.skip()
    return {}


def chosen_entry(s: Server):
    """The model jobs run on (the sd_model_checkpoint setting; the loaded one on a Ray ingress)."""
    worker = s.worker
    return s.models.find(worker.options.get("sd_model_checkpoint") or worker.model_title) or worker.entry


@router.get("/options")
def get_options(s: Server = Depends(server)):
    entry = chosen_entry(s)
    return {**s.worker.options, "sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256}


@router.post("/options")
def set_options(body: dict = Body(...), s: Server = Depends(server)):
    """Every setting checked first (options.py: unknown keys and paths refused), then the model loaded, then the
    rest stored: a refused request changes nothing."""
    from .options import Context, validate

    worker = s.worker
    values = validate(body, Context(s.facts, s.models, chosen_entry(s).sha256))
    values.pop("sd_checkpoint_hash", None)
    model = values.pop("sd_model_checkpoint", None)
    if model is not None:
        job = worker.submit(Job("load", {}, model=model))
        job.done_event.wait()
        if job.state == "failed":
            raise RequestError(job.error, 422 if job.user_error else 500)
        worker.options["sd_model_checkpoint"] = model
    worker.options.update(values)
    return None


def model_list(s: Server) -> list:
    return [{"title": e.title, "model_name": e.name, "hash": e.short_hash, "sha256": e.sha256,
             "filename": e.filename, "config": None} for e in s.models.entries]


@router.get("/sd-models")
def sd_models(s: Server = Depends(server)):
    return model_list(s)


@router.post("/refresh-checkpoints")
def refresh_checkpoints(s: Server = Depends(server)):
    s.models.refresh()
    return None


@router.get("/samplers")
def samplers():
    return [{"name": x.label, "aliases": [x.name, *x.aliases],
             "options": {"scheduler": x.schedule} if x.kind == "denoise" else {}} for x in SAMPLER_LIST]


@router.get("/schedulers")
def schedulers():
    out = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    out += [{"name": k, "label": label, "aliases": None,  # quad: DDIM and PLMS only
             "default_rho": 7.0 if k == "karras" else -1, "need_inner_model": False}
            for k, label in SCHEDULE_LABELS.items()]
    return out


@router.get("/upscalers")
def upscalers(s: Server = Depends(server)):
    """A1111's list: the resamplers, then the model upscalers found (model_name: the kind of folder; scale: the one
    the name says, as A1111). The latent upscale of hires fix is /latent-upscale-modes."""
    from ..upscalers import NAMES

    return [*({"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in NAMES),
            *({"name": m.name, "model_name": m.kind, "model_path": str(m.path), "model_url": None, "scale": m.scale}
              for m in s.upscalers.models())]


@router.get("/latent-upscale-modes")
def latent_upscale_modes():
    return [{"name": "Latent"}]


@router.get("/sd-vae")
def sd_vae():
    return []


@router.get("/embeddings")
def embeddings(s: Server = Depends(server)):
    """The textual-inversion embeddings prompts may use, as A1111 lists them (skipped: another width)."""
    from ..checkpoints.embeddings import read_embedding, scan
    from ..errors import CheckpointError

    loaded, skipped = {}, {}
    widths = s.facts.context_widths  # SDXL: an embedding needs vectors for both encoders
    for path in scan(s.config.embeddings_dir) if s.config.embeddings_dir else []:
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


@router.get("/loras")
def loras(s: Server = Depends(server)):
    """The LoRA files prompts may name (`<lora:name:weight>`); paths relative to the LoRA folder."""
    from pathlib import Path

    from ..checkpoints.lora import LORA_SUFFIXES

    if not s.config.lora_dir or not Path(s.config.lora_dir).is_dir():
        return []
    root = Path(s.config.lora_dir).resolve()
    return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(root).as_posix(), "metadata": {}}
            for p in sorted(root.rglob("*")) if p.suffix in LORA_SUFFIXES and p.is_file()]


@router.get("/scripts")
def scripts_list():
    """The scripts `script_name` may name, lowercase as A1111 lists them."""
    from .. import scripts

    return {"txt2img": scripts.names("txt2img"), "img2img": scripts.names("img2img")}


@router.get("/script-info")
def script_info():
    """Each script per mode with its `script_args` in order: label, default value, range, choices."""
    from .. import scripts

    return scripts.info()


@router.get("/prompt-styles")
def prompt_styles(s: Server = Depends(server)):
    """The styles of `--styles-file`, as A1111 lists its styles.csv."""
    return [{"name": x.name, "prompt": x.prompt, "negative_prompt": x.negative_prompt}
            for x in s.styles.styles.values()]


@router.get("/cmd-flags")
def cmd_flags(s: Server = Depends(server)):
    """A1111's command-line flags that have a kiln meaning, from the server's settings (credentials are never
    shown: `api_auth` says only whether there are any)."""
    c = s.config
    host = c.host or "127.0.0.1"
    return {"ckpt": c.ckpt, "ckpt_dir": c.ckpt_dir, "lora_dir": c.lora_dir, "embeddings_dir": c.embeddings_dir,
            "hypernetwork_dir": None, "controlnet_dir": s.controlnets.folder if s.controlnets else c.controlnet_dir,
            "styles_file": [c.styles_file] if c.styles_file else [],
            "listen": host not in ("127.0.0.1", "localhost", "::1"), "server_name": host, "port": c.port,
            "api": True, "nowebui": False, "api_auth": "***" if c.api_auth else None,
            "medvram": c.offload == "medvram", "lowvram": c.offload == "lowvram", "no_half": c.precision == "fp32",
            "use_cpu": ["all"] if c.device == "cpu" else [], "disable_safe_unpickle": False, **_upscaler_paths(s)}


def _upscaler_paths(s: Server) -> dict:
    """A1111's esrgan_models_path, realesrgan_models_path, …: the first folder of each kind that is scanned
    (--upscaler-dir counts as ESRGAN's, unless its name is one of the kinds)."""
    from ..pipeline.upscalers import FOLDERS

    found = {}
    for folder, kind in s.upscalers.folders():
        found.setdefault(kind, str(folder))
    return {f"{kind.lower()}_models_path": found.get(kind) for kind in FOLDERS}


@router.get("/hypernetworks")
def hypernetworks():
    return []  # kiln loads no hypernetworks ({name, path} each in A1111)


@router.get("/face-restorers")
def face_restorers():
    return []  # kiln has no face-restorer model ({name, cmd_dir} each in A1111)


@router.get("/realesrgan-models")
def realesrgan_models(s: Server = Depends(server)):
    """The Real-ESRGAN files found (models/RealESRGAN, or Real-ESRGAN's release files anywhere), as A1111 lists its
    own: name, path, scale."""
    from ..pipeline.upscalers import REAL_ESRGAN

    return [{"name": m.name, "path": str(m.path), "scale": m.scale} for m in s.upscalers.models()
            if m.kind == "RealESRGAN" or m.path.stem in REAL_ESRGAN]


@router.get("/extensions")
def extensions():
    return []  # kiln has no extensions ({name, remote, branch, commit_hash, version, commit_date, enabled})


@router.post("/png-info")
def png_info(req: PngInfoRequest, s: Server = Depends(server)):
    """A PNG's parameters chunk (or a JPEG's or WebP's EXIF UserComment), parsed; the server's styles found in
    its prompts are listed as "Styles array" and taken out of them, as A1111 does."""
    from ..output.pnginfo import exif_comment, infotext_from_chunks
    from ..pipeline.infotext import parse_infotext

    if not req.image:
        raise RequestError("image: empty")
    im = decode_image(req.image, s.limits, "image")
    chunks = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = infotext_from_chunks(chunks) or exif_comment(im) or ""
    items = {k: v for k, v in chunks.items() if k != "parameters"}
    parameters = parse_infotext(text) if text else {}
    if parameters:
        found, prompt, negative = s.styles.extract(parameters["prompt"], parameters["negative_prompt"])
        if found:
            parameters.update({"prompt": prompt, "negative_prompt": negative, "Styles array": found})
    return {"info": text, "items": items, "parameters": parameters}


@router.get("/memory")
def memory():
    from .jobs import memory_report

    return memory_report()
