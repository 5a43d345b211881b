"""`kiln serve` (the HTTP APIs and the web UI, in-process or on Ray Serve) and `kiln batch` (a prompts file
to PNGs, in-process or on Ray Data)."""
from __future__ import annotations

from pathlib import Path

from ..errors import KilnError
from .common import PREPACK, add_memory_flags, add_precision_flag, say


def serve_parser(sub):
    p = sub.add_parser("serve", help="HTTP API (A1111-compatible /sdapi/v1 and /api/v1 jobs) and web UI",
                       description="Serve the model over HTTP: AUTOMATIC1111's /sdapi/v1 API, kiln's job API "
                                   "(/api/v1, with server-sent progress events) and a web UI at /. One model "
                                   "worker behind a bounded FIFO queue; the model loads once and stays warm.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--ckpt", default=None, help="the model to load first (default: the embedded demo model)")
    p.add_argument("--ckpt-dir", dest="ckpt_dir", default=None,
                   help="a folder of checkpoints clients may switch to (by name, via /sdapi/v1/options)")
    p.add_argument("--outdir", default="outputs/serve", help="where generated images are saved")
    p.add_argument("--no-save", dest="no_save", action="store_true",
                   help="do not save the web UI's and job API's results (A1111 clients' save_images still saves)")
    p.add_argument("--api-auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
                   help="HTTP Basic credentials required on every endpoint but the UI's static files")
    p.add_argument("--token", default=None, help="a bearer token accepted on every endpoint (also: KILN_TOKEN)")
    p.add_argument("--api-keys", dest="api_keys", default=None, metavar="FILE",
                   help="named bearer keys, one `name:key[:max_queued]` a line: each key's jobs queue in their own "
                        "lane, served in turn; beyond max_queued waiting jobs a key is answered 429")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_precision_flag(p)
    add_memory_flags(p)
    p.add_argument("--safety-checker", dest="safety_checker", default=None, metavar="PATH",
                   help="check every image with CompVis' NSFW checker (weights folder or file)")
    p.add_argument("--lora-dir", dest="lora_dir", default=None,
                   help="folder where <lora:name:weight> tags in prompts are looked up (listed at /sdapi/v1/loras)")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual-inversion embeddings, used in prompts by file name (listed at /sdapi/v1/embeddings)")
    p.add_argument("--upscaler-dir", dest="upscaler_dir", default=None, metavar="DIR",
                   help="model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT) for the extras API, hires fix and SD "
                   "upscale, by file name, besides models/ESRGAN, models/RealESRGAN, models/SwinIR, models/DAT")
    p.add_argument("--controlnet-dir", dest="controlnet_dir", default=None, metavar="DIR",
                   help="ControlNet files requests' units may name (listed at /controlnet/model_list; "
                        "default: models/ControlNet when it exists)")
    p.add_argument("--styles-file", dest="styles_file", default=None, metavar="PATH",
                   help="A1111's styles.csv (name, prompt, negative_prompt): the styles requests may name "
                        "(listed at /sdapi/v1/prompt-styles)")
    p.add_argument("--queue-size", dest="queue_size", type=int, default=16,
                   help="jobs waiting beyond this are refused with 503 and Retry-After")
    p.add_argument("--max-size", dest="max_size", type=int, default=2048, help="largest width/height allowed")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=8)
    p.add_argument("--preview-every", dest="preview_every", type=int, default=1,
                   help="live preview every N sampler steps (0: none)")
    p.add_argument("--data-dir", dest="data_dir", default=None, metavar="DIR",
                   help="where the job store (jobs.sqlite3) lives (default: --outdir); jobs survive restarts")
    p.add_argument("--keep-days", dest="keep_days", type=float, default=None,
                   help="delete finished jobs and their files after this many days (default: keep them)")
    p.add_argument("--keep-jobs", dest="keep_jobs", type=int, default=None,
                   help="keep only the newest N finished jobs, deleting the others' files (default: all)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds the running job may take to finish before it is stopped "
                        "and recorded to run again at the next start")
    p.add_argument("--preview-decoder", dest="preview_decoder", default=None, metavar="FILE",
                   help="TAESD/TAESDXL decoder of the live previews (default: the model's taesd_decoder.* or "
                        "taesdxl_decoder.* in --vae-approx-dir when present)")
    p.add_argument("--vae-approx-dir", dest="vae_approx_dir", default=None, metavar="DIR",
                   help="TAESD decoders under A1111's names, for previews and sd_vae_decode_method TAESD "
                        "(default: models/VAE-approx)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="deploy on Ray Serve (a local cluster, or the one at ADDRESS); see --replicas")
    p.add_argument("--replicas", type=int, default=1, help="model replicas on Ray Serve (each loads the model once)")
    p.add_argument("--min-replicas", dest="min_replicas", type=int, default=None,
                   help="autoscale between --min-replicas and --max-replicas instead of a fixed count")
    p.add_argument("--max-replicas", dest="max_replicas", type=int, default=None)
    p.add_argument("--max-ongoing-requests", dest="max_ongoing_requests", type=int, default=1,
                   help="jobs one model replica holds at once (it renders one at a time; the ingress queues "
                        "the rest and dispatches to free replicas)")
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def run_serve(opt):
    import logging
    import os

    from ..server import Limits, ServerConfig, create_app, parse_api_auth

    try:
        import uvicorn  # noqa: F401  (checked here: a one-line error before the model loads)
    except ImportError:
        raise KilnError("kiln serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    try:
        auth = parse_api_auth(opt.api_auth)
    except ValueError as e:
        raise KilnError(str(e)) from None
    token = opt.token or os.environ.get("KILN_TOKEN") or None
    keys = []
    if opt.api_keys:
        from ..server.clients import read_api_keys

        keys = read_api_keys(opt.api_keys)
    for name in ("queue_size", "max_size", "max_batch_size"):
        if getattr(opt, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("preview_every", "shutdown_timeout", "keep_days", "keep_jobs"):
        if (getattr(opt, name) or 0) < 0:
            raise KilnError(f"--{name.replace('_', '-')} must be 0 or more")
    if opt.ckpt and not Path(opt.ckpt).exists():
        raise KilnError(f"--ckpt {opt.ckpt}: no such file or folder")
    if opt.ckpt_dir and not Path(opt.ckpt_dir).is_dir():
        raise KilnError(f"--ckpt-dir {opt.ckpt_dir}: not a folder")
    if opt.lora_dir and not Path(opt.lora_dir).is_dir():
        raise KilnError(f"--lora-dir {opt.lora_dir}: not a folder")
    if opt.embeddings_dir and not Path(opt.embeddings_dir).is_dir():
        raise KilnError(f"--embeddings-dir {opt.embeddings_dir}: not a folder")
    if opt.upscaler_dir and not Path(opt.upscaler_dir).is_dir():
        raise KilnError(f"--upscaler-dir {opt.upscaler_dir}: not a folder")
    if opt.vae_approx_dir and not Path(opt.vae_approx_dir).is_dir():
        raise KilnError(f"--vae-approx-dir {opt.vae_approx_dir}: not a folder")
    if opt.preview_decoder and not Path(opt.preview_decoder).exists():
        raise KilnError(f"--preview-decoder {opt.preview_decoder}: no such file or folder")
    if opt.controlnet_dir and not Path(opt.controlnet_dir).is_dir():
        raise KilnError(f"--controlnet-dir {opt.controlnet_dir}: not a folder")
    if opt.styles_file:
        from ..styles import read_styles

        read_styles(opt.styles_file)  # a bad file is refused before the model loads
    if opt.host not in ("127.0.0.1", "localhost", "::1") and not (auth or token or keys):
        say(f"kiln: warning: listening on {opt.host} without --api-auth, --token or --api-keys: anyone who can "
            "reach this machine can use the API")
    logging.basicConfig(level=opt.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = ServerConfig(ckpt=opt.ckpt, ckpt_dir=opt.ckpt_dir, outdir=opt.outdir, save=not opt.no_save,
                          device=opt.device, precision=opt.precision, offload=opt.offload, prepack=PREPACK[opt.prepack],
                          limits=Limits(max_size=opt.max_size, max_batch_size=opt.max_batch_size,
                                        queue_size=opt.queue_size),
                          api_auth=auth, token=token, api_keys=keys, preview_every=opt.preview_every,
                          safety_checker=opt.safety_checker, lora_dir=opt.lora_dir,
                          embeddings_dir=opt.embeddings_dir, styles_file=opt.styles_file, host=opt.host,
                          port=opt.port, controlnet_dir=opt.controlnet_dir, data_dir=opt.data_dir,
                          keep_days=opt.keep_days or None, keep_jobs=opt.keep_jobs or None,
                          shutdown_timeout=opt.shutdown_timeout, upscaler_dir=opt.upscaler_dir,
                          vae_approx_dir=opt.vae_approx_dir, preview_decoder=opt.preview_decoder)
    if opt.ray is not None:
        from ..distributed.serve import run

        for name in ("replicas", "max_ongoing_requests"):
            if getattr(opt, name) < 1:
                raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
        say(f"kiln: deploying on Ray Serve at http://{opt.host}:{opt.port}/")
        run(config, host=opt.host, port=opt.port, address=opt.ray or None, num_replicas=opt.replicas,
            min_replicas=opt.min_replicas, max_replicas=opt.max_replicas,
            max_ongoing_requests=opt.max_ongoing_requests)
        return
    say("kiln: loading the model ...")
    app = create_app(config)
    say(f"kiln: serving {app.state.worker.model_title} on http://{opt.host}:{opt.port}/ "
        f"(A1111 API under /sdapi/v1, docs at /docs)")
    try:
        serve_until_signal(app, opt)
    finally:
        app.state.worker.stop()  # stop the running job at its next step; stored jobs stay queued in the store


def serve_until_signal(app, opt):
    """uvicorn, with a graceful stop: the first SIGTERM/SIGINT refuses new jobs (503) while the running job gets
    --shutdown-timeout seconds to finish (or is recorded to run again at the next start); a second one stops now."""
    import threading

    import uvicorn

    worker = app.state.worker

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if self.draining:
                self.should_exit = self.force_exit = True
                return
            self.draining = True
            say(f"kiln: stopping: new jobs are refused; the running job has {opt.shutdown_timeout:g} s to finish")

            def drain():
                worker.stop(opt.shutdown_timeout)
                self.should_exit = True

            threading.Thread(target=drain, name="kiln-shutdown", daemon=True).start()

    Server(uvicorn.Config(app, host=opt.host, port=opt.port, log_level=opt.log_level)).run()


def batch_parser(sub):
    p = sub.add_parser("batch", help="generate one image per row of a prompts file (in-process or on Ray)",
                       description="Generate one image per row of a prompts file: text (one prompt per line), "
                                   "JSONL or CSV with per-row prompt, negative_prompt, seed, steps, sampler, "
                                   "schedule, cfg_scale, width, height (and ControlNet units: controlnet, "
                                   "control_image, control_weight, …). Writes OUTDIR/images/NNNNNN.png (with "
                                   "infotext) and OUTDIR/manifest.jsonl; re-running skips finished rows.")
    p.add_argument("prompts", help="the prompts file (.txt, .jsonl or .csv)")
    p.add_argument("--outdir", default="outputs/batch", help="a folder, or a pyarrow filesystem URI (s3://…)")
    p.add_argument("--ckpt", default=None, help="the model (default: the embedded demo model)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data (a local cluster, or the cluster at ADDRESS, e.g. ray://head:10001 or auto)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the model once (one GPU each "
                                                          "when the cluster has GPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per renderer; outputs are byte-identical across runs with the same value "
                        "(default: all cores in-process; on Ray cores/workers, leaving Ray one core when a "
                        "worker would take them all)")
    # the run's defaults for rows that do not set them; without the flag, kiln's own (GenerationParams)
    p.add_argument("--seed", type=int, default=None, help="base seed: a row without a seed gets seed + its row "
                                                          "index (default 42)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    p.add_argument("--sampler", default=None, help="sampler, our name or A1111's (default ddim)")
    p.add_argument("--schedule", default=None, help="noise schedule (default: the sampler's)")
    p.add_argument("--scale", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--W", type=int, default=None, help="width (default: the model's native size)")
    p.add_argument("--H", type=int, default=None, help="height (default: the model's native size)")
    p.add_argument("--negative-prompt", dest="negative_prompt", default=None)
    p.add_argument("--controlnet", action="append", default=[], metavar="FILE",
                   help="the ControlNet of rows that name a control_image but no controlnet (repeatable: one unit "
                        "each; docs/controlnet.md)")
    p.add_argument("--retry-errors", dest="retry_errors", action="store_true",
                   help="run rows again whose earlier attempt failed")
    p.add_argument("--device", default="auto")
    add_precision_flag(p)
    return p


def run_batch_command(opt):
    from ..demo.report import EMBEDDED
    from ..distributed.batch import run_batch
    from ..pipeline import GenerationParams

    if opt.workers < 1:
        raise KilnError("--workers must be at least 1")
    if opt.threads is not None and opt.threads < 1:
        raise KilnError("--threads must be at least 1")
    ckpt = opt.ckpt or str(EMBEDDED)
    if "://" not in ckpt and not Path(ckpt).exists():
        raise KilnError(f"--ckpt {ckpt}: no such file or folder")
    given = dict(seed=opt.seed, steps=opt.steps, sampler=opt.sampler, schedule=opt.schedule, cfg_scale=opt.scale,
                 width=opt.W, height=opt.H, negative_prompt=opt.negative_prompt)
    defaults = GenerationParams.make(**{k: v for k, v in given.items() if v is not None})
    for f in opt.controlnet:
        if not Path(f).is_file():
            raise KilnError(f"--controlnet {f}: no such file")
    s = run_batch(opt.prompts, opt.outdir, ckpt=ckpt, defaults=defaults, use_ray=opt.ray is not None,
                  ray_address=opt.ray or None, workers=opt.workers, device=opt.device, precision=opt.precision,
                  retry_errors=opt.retry_errors, threads_per_worker=opt.threads, controlnets=opt.controlnet)
    say(f"kiln: {s.rows} rows: {s.ok} written, {s.errors} failed (see manifest.jsonl), {s.skipped} already done "
        f"before this run; {s.seconds:.1f} s")
    return 1 if s.errors else 0
