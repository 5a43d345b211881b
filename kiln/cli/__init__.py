"""`kiln` command line: CompVis' script flags, same spellings and defaults, plus the modern options.

One module per kind of command: `generate` (txt2img, img2img, inpaint), `service` (serve, batch) and `tools`
(train, eval, info, bench), `upscale`; `main` dispatches."""
from __future__ import annotations

import argparse

from ..errors import KilnError
from . import generate, service, tools, upscale
from .common import say


def build_parser():
    parser = argparse.ArgumentParser(prog="kiln", description="Stable Diffusion in plain, fast, verifiable PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in generate.MODES:
        generate.txt2img_parser(sub, command)
    tools.train_parser(sub)
    tools.eval_parser(sub)
    tools.info_parser(sub)
    service.serve_parser(sub)
    service.batch_parser(sub)
    tools.bench_parser(sub)
    upscale.upscale_parser(sub)
    return parser


COMMANDS = {"txt2img": generate.run_txt2img, "img2img": generate.run_txt2img, "inpaint": generate.run_txt2img,
            "train": tools.run_train, "eval": tools.run_eval, "info": tools.run_info, "serve": service.run_serve,
            "batch": service.run_batch_command, "bench": tools.run_bench,
            "upscale": upscale.run_upscale}


def main(argv=None):
    opt = build_parser().parse_args(argv)
    try:
        rc = COMMANDS[opt.command](opt)
    except KilnError as e:
        say(f"kiln: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("kiln: interrupted")
        return 130
    except MemoryError:
        say("kiln: error: out of memory; try fewer --n_samples or a smaller --H/--W")
        return 1
    return rc if isinstance(rc, int) else 0

