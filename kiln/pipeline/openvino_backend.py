"""`--backend openvino`: kiln's own UNet, VAE and text encoder(s) run through OpenVINO's torch.compile backend
(`openvino.torch`) on the CPU, under kiln's unchanged pipeline, samplers and features (docs/performance.md).

What the backend needs from kiln, found with torch 2.13 and openvino 2026.4:
- `aot_autograd`: OpenVINO's default path (its own `make_fx` inside dynamo) fails in dynamo's guard builder under
  torch 2.13 (IndexError in `produce_guards_verbose` at the first group norm).
- `torch._dynamo.config.prepare_freezing`: dynamo now always lifts module weights to graph inputs, so without it
  OpenVINO gets every weight as a runtime input (re-laid out on every call). With it, aot_autograd hands the
  weights over as graph constants, which OpenVINO folds and pre-packs; so, as with inductor's freezing, a weight
  change (LoRA) needs `reset` (the next call recompiles).
- OpenVINO returns its infer request's own output buffer, which the next call overwrites: `_Owned` copies it.
- No bf16 tensors cross into OpenVINO (it converts through numpy): the weights stay fp32 and OpenVINO is told the
  precision to compute in (`INFERENCE_PRECISION_HINT`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..cache import cache_dir
from ..errors import KilnError

BACKENDS = ("torch", "openvino")


def default_cache_dir() -> Path:
    """Compiled models are kept in $KILN_CACHE/openvino (default ~/.cache/kiln/openvino). OpenVINO's cache key
    covers the weights' values, so another checkpoint or a LoRA never picks up a stale compiled model."""
    return cache_dir("openvino")


def check_openvino(device: str | torch.device = "cpu", offload: str | None = None) -> None:
    """A one-line error for what the backend cannot do, before any model is loaded."""
    kind = torch.device(device).type if str(device) != "auto" else "cpu"
    if kind != "cpu":
        raise KilnError(f"--backend openvino runs kiln's models on the CPU; it does not go with --device {device}")
    if offload:
        raise KilnError(f"--backend openvino and --{offload} do not go together (there is nothing to offload on a "
                        "CPU, and compiled graphs keep the weights)")
    try:
        import openvino.torch  # noqa: F401  (registers the "openvino" torch.compile backend)
    except ImportError:
        raise KilnError("--backend openvino needs OpenVINO: pip install 'kiln[openvino]' (or: pip install "
                        "openvino)") from None


def ov_precision(precision: str) -> str:
    """OpenVINO's compute precision for kiln's `precision`: fp32 stays f32 (OpenVINO's CPU default is bf16 where
    the CPU has it, which would change the pixels silently); autocast is bf16 where the CPU has native bf16, as
    kiln's eager autocast (`devices.compute_dtype`)."""
    from .devices import cpu_has_bf16

    return "bf16" if precision == "autocast" and cpu_has_bf16() else "f32"


def options(precision: str, cache_dir: str | Path | None = None) -> dict:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return {"device": "CPU", "aot_autograd": True,
            "config": {"INFERENCE_PRECISION_HINT": ov_precision(precision), "CACHE_DIR": str(cache)}}


class _Owned:
    """A compiled forward whose tensor outputs are the caller's own (OpenVINO reuses its output buffers). After a
    call that compiled, the module's weights' pages go back to the kernel: OpenVINO runs on its own re-laid-out
    copy, and pages mapped from the checkpoint are re-read from it if anything (a LoRA merge, the next compile)
    reads them again, so the process does not hold the weights twice."""

    def __init__(self, compiled, module):
        self.compiled, self.module = compiled, module

    def __call__(self, *args, **kwargs):
        compiled_before = _compiled_count()
        out = self.compiled(*args, **kwargs)
        if _compiled_count() != compiled_before:
            from ..models.conv import release_pages

            for t in (*self.module.parameters(), *self.module.buffers()):
                release_pages(t)
        return out.clone() if isinstance(out, torch.Tensor) else type(out)(t.clone() for t in out)


def _compiled_count() -> int:
    execute = sys.modules.get("openvino.frontend.pytorch.torchdynamo.execute")
    return len(execute.compiled_cache) if execute is not None else 0


def compile_openvino(pipe, cache_dir: str | Path | None = None) -> None:
    """Route the UNet, the VAE decoder and encoder and the text encoder(s) through OpenVINO, static shapes (one
    compiled model per input shape; the first call at a shape compiles, later processes load it from `cache_dir`).
    The pipeline must hold fp32 weights on the CPU (`load(..., backend="openvino")` keeps them fp32 whatever the
    precision; `pipe.precision` picks OpenVINO's compute precision)."""
    check_openvino(pipe.device)
    if pipe.dtype != torch.float32:
        raise KilnError("--backend openvino takes fp32 weights (it computes in bf16 itself with --precision "
                        "autocast): load with backend='openvino'")
    from ..models.conv import prepack

    prepack(pipe.model, False)  # OpenVINO packs the weights for itself; drop kiln's eager packed copies
    torch._dynamo.config.prepare_freezing = True  # weights as graph constants (module docstring)
    opts = options(pipe.precision, cache_dir)
    m = pipe.model
    for module in (m.unet, m.vae.decoder, m.vae.encoder, *m.text_models):
        module.forward = _Owned(torch.compile(module.forward, backend="openvino", dynamic=False, options=opts), module)
    pipe.frozen = True  # LoRA changes reset the compiled code (`runtime.reset_compiled`)


def clear_caches() -> None:
    """Drop the compiled models OpenVINO's backend keeps beside dynamo's code (nothing when it is not in use)."""
    execute = sys.modules.get("openvino.frontend.pytorch.torchdynamo.execute")
    if execute is not None:
        execute.clear_caches()
