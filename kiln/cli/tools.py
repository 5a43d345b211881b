"""`kiln train`, `kiln eval`, `kiln info`, `kiln bench`: the embedded demo model's trainer and evaluation, the
parameters stored in an image, the samplers, and the benchmark against diffusers."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, KilnError
from . import demo_control
from .common import say


def train_parser(sub):
    p = sub.add_parser("train", help="train the embedded demo model", description="Train kiln's tiny demo model "
                       "(the SD v1 architecture at a tiny size) on the procedural captioned-shapes data.")
    p.add_argument("what", choices=["demo", "demo-controlnet"])
    p.add_argument("--out", default=None, help="where to write the trained model (default kiln-demo.safetensors, "
                   "kiln-demo-controlnet.safetensors)")
    p.add_argument("--workdir", default=None, help="training state (resumable), loss log (default kiln-demo-train, "
                   "kiln-demo-controlnet-train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="training images to generate")
    p.add_argument("--lr", type=float, default=None, help="UNet/text learning rate (default 1e-3)")
    p.add_argument("--offset-noise", type=float, default=None, help="offset-noise strength (default 0.15)")
    p.add_argument("--caption-noise", type=float, default=None,
                   help="probability that a caption states an attribute wrongly, per attribute (default 0: "
                   "see docs/demo-model.md)")
    p.add_argument("--caption-noise-colors", type=float, default=None,
                   help="the same probability for the shape color and the background only (default: --caption-noise)")
    p.add_argument("--color-jitter", type=float, default=None,
                   help="spread of each named color in the training images, as a fraction (under 0.5) of its distance "
                   "to the nearest other palette color (default 0)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="fine-tune: start the UNet stage from this model written by `kiln train demo` "
                   "(fresh optimizer; steps count on from the model's own)")
    p.add_argument("--wise-ft", type=float, default=None, metavar="W",
                   help="with --init: write (1 - W) x the starting model + W x the fine-tune (a weight-space "
                   "ensemble, 0 < W <= 1; default 1: the fine-tune alone)")
    demo_control.add_train_flags(p)
    return p


def eval_parser(sub):
    p = sub.add_parser("eval", help="measure prompt adherence of the demo model",
                       description="Generate the held-out shapes prompts and judge them with the pixel analyzer.")
    p.add_argument("what", choices=["demo", "demo-controlnet"])
    p.add_argument("--ckpt", default=None, help="model to evaluate (default: the embedded demo model)")
    p.add_argument("--samplers", default=None, help="comma-separated sampler names, or 'all' (default ddim,plms; "
                   "demo-controlnet: ddim)")
    p.add_argument("--scales", default=None, help="comma-separated guidance scales (default 1,5; demo-controlnet: 5)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--deepcache", type=int, default=None, metavar="N", help="evaluate with DeepCache interval N")
    p.add_argument("--deepcache-depth", dest="deepcache_depth", type=int, default=3, metavar="D")
    demo_control.add_eval_flags(p)
    return p


def run_train(opt):
    from dataclasses import replace

    from ..demo.train import Trainer, TrainOptions

    if opt.what == "demo-controlnet":
        return demo_control.run_train(opt)
    demo_control.refuse(opt, demo_control.CONTROL_ONLY, opt.what)
    o = TrainOptions(seed=opt.seed)
    for field, value in (("vae_steps", opt.vae_steps), ("unet_steps", opt.unet_steps), ("images", opt.images),
                         ("lr", opt.lr), ("offset_noise", opt.offset_noise), ("caption_noise", opt.caption_noise),
                         ("caption_noise_colors", opt.caption_noise_colors), ("color_jitter", opt.color_jitter)):
        if value is not None:
            flag = "--" + field.replace("_", "-")
            zero_ok = field in ("offset_noise", "caption_noise", "caption_noise_colors", "color_jitter")
            if value < (0 if zero_ok else 1e-12):
                raise KilnError(f"{flag} must be {'0 or more' if zero_ok else 'positive'}")
            if field.startswith("caption_noise") and value > 1:
                raise KilnError(f"{flag} is a probability: at most 1")
            if field == "color_jitter" and value >= 0.5:
                raise KilnError("--color-jitter must be under 0.5, or jittered colors could cross to another name")
            o = replace(o, **{field: value})
    if opt.init:
        o = replace(o, init=opt.init)
    if opt.wise_ft is not None:
        if not 0 < opt.wise_ft <= 1:
            raise KilnError("--wise-ft must be above 0 and at most 1")
        o = replace(o, wise_ft=opt.wise_ft)
    try:
        trainer = Trainer(opt.workdir or "kiln-demo-train", o, log=lambda m: say(f"kiln: {m}"))
    except CheckpointError as e:  # only --init reads a model here: missing, unreadable, or not a kiln demo model
        raise KilnError(f"--init: {e}") from None
    trainer.run(Path(opt.out or "kiln-demo.safetensors"))


def run_eval(opt):
    from ..demo.report import EMBEDDED, table
    from ..pipeline import load

    if opt.what == "demo-controlnet":
        return demo_control.run_eval(opt)
    demo_control.refuse(opt, demo_control.EVAL_CONTROL_ONLY, opt.what)
    pipe = load(opt.ckpt or EMBEDDED, device=opt.device, precision="full")
    if opt.deepcache:
        pipe.set_deepcache(opt.deepcache, opt.deepcache_depth)
    try:
        scales = [float(s) for s in (opt.scales or "1,5").split(",")]
    except ValueError:
        raise KilnError(f"--scales must be comma-separated numbers, not {opt.scales!r}") from None
    from ..samplers import SAMPLERS

    names = opt.samplers or "ddim,plms"
    samplers = list(SAMPLERS) if names == "all" else [x.strip() for x in names.split(",") if x.strip()]
    text, _ = table(pipe, samplers=samplers, scales=scales, steps=opt.steps, seed=opt.seed)
    print(text)


def info_parser(sub):
    p = sub.add_parser("info", help="show an image's generation parameters, or the samplers",
                       description="Print the generation parameters stored in a PNG (kiln's or A1111's), decode its "
                                   "invisible watermark, or list the samplers and schedules.")
    p.add_argument("image", nargs="?", help="a PNG written by kiln or A1111")
    p.add_argument("--json", action="store_true", help="print the parameters as JSON")
    p.add_argument("--watermark", action="store_true", help="decode the image's invisible watermark")
    p.add_argument("--watermark-text", dest="watermark_text", default="StableDiffusionV1",
                   help="the watermark text expected (its length is what the decoder needs)")
    p.add_argument("--samplers", action="store_true", help="list the samplers and schedules")
    return p


def run_info(opt):
    if opt.samplers or not opt.image:
        return print_samplers()
    import json

    from ..output.pnginfo import read_text
    from ..pipeline.infotext import parse_infotext

    if opt.watermark:
        import numpy as np
        from PIL import Image

        from ..pipeline.watermark import MIN_WATERMARK_SIZE, decode_watermark

        try:
            with Image.open(opt.image) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise KilnError(f"{opt.image}: not a readable image ({e})") from None
        if min(pixels.shape[:2]) < MIN_WATERMARK_SIZE:
            raise KilnError(f"{opt.image}: images smaller than {MIN_WATERMARK_SIZE}x{MIN_WATERMARK_SIZE} carry no "
                            "watermark")
        found = decode_watermark(pixels, len(opt.watermark_text.encode("utf-8")))
        print(f"watermark: {found!r}" + (" (matches)" if found == opt.watermark_text else
                                          f" (does not match {opt.watermark_text!r})"))
        return None
    text = read_text(opt.image)
    print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if opt.json else text)
    return None


def print_samplers():
    from ..samplers import SAMPLER_LIST, SCHEDULES
    from ..samplers.schedules import SCHEDULE_LABELS

    rows = [("name", "A1111 name", "default schedule", "eta", "UNet calls/step")]
    for s in SAMPLER_LIST:
        rows.append((s.name, s.label, s.schedule if s.kind == "denoise" else "normal (CompVis uniform)",
                     "-" if s.eta is None else f"{s.eta:g}", str(s.evals_per_step)))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows))
    print("\nschedules: " + ", ".join(f"{k} ({SCHEDULE_LABELS[k]})" for k in SCHEDULES)
          + "; automatic = the sampler's default.\nDDIM and PLMS step on trained timesteps: normal (CompVis' "
          "uniform), quad, leading, trailing or linspace")
    from ..checkpoints.detect import detect
    from ..checkpoints.sources import open_file
    from ..demo.report import EMBEDDED

    own = detect(open_file(EMBEDDED)).sampler_schedules  # the header only, as the loader reads it
    print("a model may set its own defaults; the embedded demo model's: "
          + (", ".join(f"{k} {v}" for k, v in own.items()) or "none"))


def bench_parser(sub):
    p = sub.add_parser("bench", help="kiln against diffusers on the same weights (speed, memory, load time)",
                       description="Runs kiln and diffusers (a test-only dependency) in fresh processes on the same "
                                   "weights (random full-size SD 1.5, built once and cached, or --weights) and prints "
                                   "kiln/diffusers ratios: UNet step, VAE decode, txt2img, load time, peak memory, "
                                   "and the largest difference between the two images.")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256; 512 on a GPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps of the txt2img run (default 4; with --peers: Euler steps, default 6)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--repeat", type=int, default=3, help="timed UNet calls (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both runs (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also run kiln with torch.compile (--compile)")
    p.add_argument("--openvino", action="store_true",
                   help="also run kiln --backend openvino (pip install openvino; compiled models cached in "
                        "~/.cache/kiln/openvino)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true",
                   help="also run kiln with channels-last weights (--channels-last)")
    p.add_argument("--no-prepack", dest="no_prepack", action="store_true",
                   help="also run kiln without oneDNN weight pre-packing (--no-prepack: PyTorch's plain eager path)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="also run kiln with DeepCache interval N (compare the txt2img time; the image differs)")
    p.add_argument("--medvram", action="store_true", help="GPU: also run kiln with --medvram (peak device memory)")
    p.add_argument("--lowvram", action="store_true", help="GPU: also run kiln with --lowvram (peak device memory)")
    p.add_argument("--weights", default=None, help="a CompVis SD 1.x file instead of the random weights")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    p.add_argument("--peers", nargs="?", const="kiln,diffusers,openvino,sdcpp", default=None, metavar="LIST",
                   help="CPU: kiln against diffusers, OpenVINO and stable-diffusion.cpp (or a subset: "
                        "kiln,diffusers,openvino,sdcpp), each in its own venv under ~/.cache/kiln/peers; "
                        "end-to-end txt2img, Euler, CFG 7.5 (see docs/performance.md)")
    p.add_argument("--sizes", default="256,512", help="with --peers: image sides (default 256,512)")
    p.add_argument("--precisions", default=None,
                   help="with --peers: fp32,bf16 (default: both where the CPU has native bf16, else fp32)")


def run_bench(opt):
    from ..bench import bench

    if opt.peers is not None:
        from ..bench_peers import bench_peers

        opt.steps = 6 if opt.steps is None else opt.steps
        bench_peers(opt)
        return 0
    opt.steps = 4 if opt.steps is None else opt.steps
    if opt.repeat < 1 or opt.steps < 1:
        raise KilnError("--repeat and --steps must be at least 1")
    bench(opt)
    return 0
