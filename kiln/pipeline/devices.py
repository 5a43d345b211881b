"""Where and in what precision a model runs: chosen at run time (CUDA, Apple MPS or the CPU)."""
from __future__ import annotations

import torch

from ..errors import KilnError

PRECISIONS = ("auto", "full", "autocast")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KilnError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise KilnError("--device mps: no Apple MPS device is available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise KilnError(f"--device must be auto, cpu, cuda or mps, not {name!r}")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix math (AVX512-BF16 or AMX); without it bf16 on a CPU is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` (every front end's default) is `autocast` on CUDA and MPS and `full` on CPUs: half precision where
    GPUs are built for it, and on a CPU the same pixels on every kind of CPU (bf16 is opt-in there)."""
    if precision not in PRECISIONS:
        raise KilnError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "full" if device.type == "cpu" else "autocast"
    return precision


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`full` is fp32; `autocast` is fp16 on CUDA/MPS and bf16 on CPUs with native bf16 (fp32 on other CPUs)."""
    precision = resolve_precision(precision, device)
    if precision == "full":
        return torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float16
