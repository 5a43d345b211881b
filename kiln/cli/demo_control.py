"""`kiln train demo-controlnet` and `kiln eval demo-controlnet`: the demo ControlNet's trainer and evaluation (flags
added to `kiln train`/`kiln eval`; those of the other `what` are refused, never ignored)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, KilnError
from .common import say

# Flags of `kiln train` that only one of its trainers reads (dest names).
DEMO_ONLY = ("vae_steps", "unet_steps", "caption_noise", "caption_noise_colors", "color_jitter", "init", "wise_ft")
CONTROL_ONLY = ("steps", "batch", "base", "ema_decay", "caption_dropout", "shape_dropout", "timesteps", "hint_init")
EVAL_DEMO_ONLY = ("deepcache",)
EVAL_CONTROL_ONLY = ("controlnet", "cases", "weight")


def add_train_flags(p):
    g = p.add_argument_group("demo-controlnet (docs/controlnet.md, \"Demo ControlNet\")")
    g.add_argument("--steps", type=int, default=None, help="training steps in all (default 1000)")
    g.add_argument("--batch", type=int, default=None, help="images per step (default 32)")
    g.add_argument("--base", default=None, metavar="MODEL", help="the demo model to steer (default: the embedded one)")
    g.add_argument("--ema-decay", dest="ema_decay", type=float, default=None,
                   help="EMA of the weights (default 0: off)")
    g.add_argument("--caption-dropout", dest="caption_dropout", type=float, default=None,
                   help="share of empty prompts (default 0.5)")
    g.add_argument("--shape-dropout", dest="shape_dropout", type=float, default=None,
                   help="of the captions kept, the fraction whose shape word becomes 'shape' (default 0)")
    g.add_argument("--timesteps", choices=["uniform", "cubic"], default=None,
                   help="how training timesteps are drawn (default uniform; cubic: T2I-Adapter's, mostly high noise)")
    g.add_argument("--hint-init", dest="hint_init", choices=["gaussian", "torch"], default=None,
                   help="the hint block's initial weights (default gaussian: He-normal; torch: PyTorch's default)")


def add_eval_flags(p):
    g = p.add_argument_group("demo-controlnet")
    g.add_argument("--controlnet", default=None, metavar="FILE",
                   help="the ControlNet to evaluate (default: the embedded demo ControlNet)")
    g.add_argument("--cases", type=int, default=None, help="evaluation cases, 1 to 44 (default 44)")
    g.add_argument("--weight", type=float, default=None, help="the ControlNet's weight (default 1)")


def refuse(opt, names, what: str):
    given = [n for n in names if getattr(opt, n, None) not in (None, False)]
    if given:
        raise KilnError(f"--{given[0].replace('_', '-')} is not an option of `{opt.command} {what}`")


def run_train(opt):
    """`kiln train demo-controlnet`."""
    from dataclasses import replace

    from ..demo.train_controlnet import ControlTrainer, ControlTrainOptions

    refuse(opt, DEMO_ONLY, opt.what)
    o = ControlTrainOptions(seed=opt.seed)
    rules = {"steps": (lambda v: v >= 1, "at least 1"), "batch": (lambda v: v >= 1, "at least 1"),
             "images": (lambda v: v >= 1, "at least 1"), "lr": (lambda v: v > 0, "positive"),
             "offset_noise": (lambda v: v >= 0, "0 or more"), "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
             "caption_dropout": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
             "shape_dropout": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]")}
    for field, (ok, what) in rules.items():
        value = getattr(opt, field)
        if value is None:
            continue
        if not ok(value):
            raise KilnError(f"--{field.replace('_', '-')} must be {what}, not {value:g}")
        o = replace(o, **{field: value})
    for field in ("base", "timesteps", "hint_init"):
        if getattr(opt, field):
            o = replace(o, **{field: getattr(opt, field)})
    try:
        trainer = ControlTrainer(opt.workdir or "kiln-demo-controlnet-train", o, log=lambda m: say(f"kiln: {m}"))
    except CheckpointError as e:  # only --base reads a model: missing, unreadable, not a model
        raise KilnError(f"--base: {e}") from None
    trainer.run(Path(opt.out or "kiln-demo-controlnet.safetensors"))


def run_eval(opt):
    """`kiln eval demo-controlnet`: the table with the ControlNet and with the prompt alone, per sampler and scale."""
    from ..demo.control_report import EMBEDDED_CONTROLNET, table
    from ..demo.report import EMBEDDED
    from ..pipeline import load

    refuse(opt, EVAL_DEMO_ONLY, opt.what)
    controlnet = opt.controlnet or EMBEDDED_CONTROLNET
    if not opt.controlnet and not EMBEDDED_CONTROLNET.is_file():
        raise KilnError("no embedded demo ControlNet ships yet: pass --controlnet FILE (kiln train demo-controlnet)")
    if not Path(controlnet).is_file():
        raise KilnError(f"--controlnet {controlnet}: no such file")
    pipe = load(opt.ckpt or EMBEDDED, device=opt.device, precision="full")
    try:
        scales = [float(s) for s in (opt.scales or "5").split(",")]
    except ValueError:
        raise KilnError(f"--scales must be comma-separated numbers, not {opt.scales!r}") from None
    for sampler in [x.strip() for x in (opt.samplers or "ddim").split(",") if x.strip()]:
        for scale in scales:
            text, _ = table(pipe, str(controlnet), n=opt.cases or 44, steps=opt.steps, sampler=sampler,
                            cfg_scale=scale, seed=opt.seed, weight=1.0 if opt.weight is None else opt.weight)
            print(f"{sampler}, {opt.steps} steps, scale {scale:g}:\n{text}\n")
