"""Generation: the class that holds a loaded model (`Pipeline`), the parameters of a generation
(`GenerationParams`), the one batch loop (`generate`), the denoiser and its wrappers, and the text, VAE and LoRA
stages. The CLI, the server, `kiln batch` and Ray all call this.

    pipe = kiln.load("v1-5-pruned-emaonly.safetensors")
    result = pipe.txt2img("a red circle on a blue background", steps=20, seed=1)
    result.images[0].save("out.png")
"""
from ..samplers import SAMPLERS
from .canvas import prepare_init
from .devices import PRECISIONS, compute_dtype, cpu_has_bf16, pick_device, resolve_precision
from .generate import Hooks, Result, generate, join
from .model import Pipeline
from .noise import generators, randn, slerp, start_noise
from .params import FILLS, GenerationParams, check, recorded_schedule
from .runtime import load
from .text import Cond
from .vae import to_uint8

__all__ = ["Pipeline", "Result", "GenerationParams", "Hooks", "Cond", "load", "generate", "join", "pick_device",
           "compute_dtype", "cpu_has_bf16", "resolve_precision", "PRECISIONS", "SAMPLERS", "FILLS", "check",
           "recorded_schedule", "generators", "randn", "slerp", "start_noise", "to_uint8", "prepare_init"]
