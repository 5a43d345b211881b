"""What every `kiln` command shares: messages, and the memory flags."""
from __future__ import annotations

import sys

PREPACK = {"auto": "auto", "on": True, "off": False}
PRECISION_HELP = ("auto (the default): fp16 on CUDA/MPS, fp32 on CPUs; full = fp32; autocast = fp16 on CUDA/MPS, "
                  "bf16 on CPUs with native bf16 (else fp32)")


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def add_precision_flag(p):
    from ..pipeline import PRECISIONS

    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help=PRECISION_HELP)


def add_memory_flags(p):
    p.add_argument("--prepack", choices=["auto", "on", "off"], default="auto",
                   help="CPU: pre-pack convolution and UNet linear weights for oneDNN (UNet 1.3-1.7x faster at "
                        "256x256, about even at 512x512). auto: fp32 where memory stays flat (weights mapped from an "
                        "fp32 file), bf16 always; on: also fp32 weights converted at load (+ their size); "
                        "docs/performance.md")
    p.add_argument("--no-prepack", dest="prepack", action="store_const", const="off", help="the same as --prepack off")
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--medvram", dest="offload", action="store_const", const="medvram", default=None,
                      help="GPU: keep the weights in CPU memory; text encoder, UNet and VAE visit the GPU one at a "
                           "time")
    vram.add_argument("--lowvram", dest="offload", action="store_const", const="lowvram",
                      help="GPU: as --medvram, and the UNet too goes block by block (least memory, slowest)")
