"""How a model is loaded and run: device and precision, pre-packed or compiled kernels, offloading, attention
slicing."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints import load_model
from ..errors import KilnError
from .devices import compute_dtype, pick_device, resolve_precision
from .openvino_backend import BACKENDS, check_openvino, clear_caches, compile_openvino


def load(path: str | Path, *, device: str = "auto", precision: str = "auto", ema: str = "auto",
         vae: str | None = None, config: str | None = None, prediction: str | None = None,
         channels_last: bool | None = None, prepack: bool | str = "auto", offload: str | None = None,
         backend: str = "torch"):
    """Load a checkpoint (CompVis file or diffusers folder) into a ready Pipeline. `precision`: "auto" (every
    front end's default: fp16 on CUDA/MPS, fp32 on CPUs), "full" (fp32) or "autocast" (fp16 on CUDA/MPS, bf16 on
    CPUs with native bf16); see `kiln.pipeline.devices`. `prediction` ("eps" | "v")
    overrides the detected parameterization (SD 2.x files carry no such fact). `channels_last` (default: on
    CUDA) stores the UNet's and VAE's convolution weights NHWC, which cuDNN and oneDNN run faster; results differ
    from NCHW only by float summation order. Not the CPU default: there the weights stay in the file's memory map
    (no copy, fast load), and NHWC copies would add 2.7 GB of resident memory for a 10% faster UNet
    (docs/performance.md). `prepack` (CPU, fp32 and bf16) packs the convolution and UNet linear weights for oneDNN at
    the first call at an input shape (`kiln.models.conv`): "auto" for fp32 where memory stays flat (weights
    memory-mapped from an fp32 file) and for bf16 always, True everywhere, False never (PyTorch's plain eager
    kernels). `offload` ("medvram" | "lowvram") keeps the weights in CPU memory and moves each part to the GPU
    while it runs (`offload`); on a CPU there is nothing to offload, and it is ignored with a notice. `backend`
    "openvino" runs the models through OpenVINO on the CPU (`openvino_backend`): the weights load in fp32 and
    `precision` picks OpenVINO's compute precision."""
    from .model import Pipeline

    if backend not in BACKENDS:
        raise KilnError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "openvino":
        check_openvino(device, offload)
        device = "cpu"
    dev = pick_device(device)
    dtype = compute_dtype(precision, dev) if backend == "torch" else torch.float32
    nhwc = channels_last if channels_last is not None else dev.type == "cuda"
    notices = []
    if offload and dev.type == "cpu":
        notices.append(f"--{offload}: the model runs on the CPU, so there is nothing to offload; ignored")
        offload = None
    model, info = load_model(path, ema=ema, vae=vae, config_yaml=config, prediction=prediction, dtype=dtype,
                             device="cpu" if offload else dev, channels_last=nhwc)
    if prepack != "auto":
        from ..models.conv import prepack as set_prepack

        set_prepack(model, prepack)
    pipe = Pipeline(model, info, dev, dtype, resolve_precision(precision, dev), notices=notices)
    if offload:
        set_offload(pipe, offload)
    if backend == "openvino":
        compile_openvino(pipe)
    return pipe


def reset_compiled() -> None:
    """After a weight change (LoRA): compiled graphs that hold the weights as constants recompile at their next
    call (`compile_model` on a CPU, `--backend openvino`)."""
    torch._dynamo.reset()
    clear_caches()


def compile_model(pipe, freeze: bool | None = None) -> None:
    """torch.compile the UNet and the VAE decoder in place (dynamic=False: one graph per image size; the
    first call at a size compiles, inductor's on-disk cache shortens it in later processes). Parameter names
    and state dicts are unaffected.

    `freeze` (default: on CPUs) turns on inductor's freezing: weights become constants pre-packed for oneDNN,
    which is most of compile's gain on a CPU, at the cost of a second, pre-packed copy of the weights. A frozen
    graph does not see weight changes, so LoRA changes reset the compiled code (the next call recompiles)."""
    import torch._inductor.config as inductor

    if pipe.offloader is not None:
        raise KilnError("--compile and --medvram/--lowvram do not go together (compiled graphs keep the weights)")
    from ..models.conv import prepack

    prepack(pipe.model, False)  # compiled code packs (or fuses) for itself; drop eager packed copies
    pipe.frozen = pipe.device.type == "cpu" if freeze is None else freeze
    inductor.freezing = pipe.frozen
    pipe.model.unet.compile(dynamic=False)
    pipe.model.vae.decoder.compile(dynamic=False)


def set_offload(pipe, mode: str | None) -> None:
    """`mode` "medvram" or "lowvram" (A1111's flags, `kiln.offload`): the weights stay in CPU memory and each part
    of the model moves to the device only while it runs. None: everything back on the device."""
    from ..offload import MODES, offload

    if mode not in (None, *MODES):
        raise KilnError(f"offload mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode and pipe.frozen is not None:
        raise KilnError("--medvram/--lowvram and --compile do not go together (compiled graphs keep the weights)")
    if pipe.offloader is not None:
        pipe.offloader.remove()
        pipe.offloader = None
    if mode:
        pipe.model.to("cpu")
        pipe.offloader = offload(pipe.model, pipe.device, mode)


def attention_slicing(pipe, size: int | None) -> None:
    """UNet attention over at most `size` queries at a time (None: all). PyTorch's SDPA already runs in
    bounded memory on CUDA and CPUs; this is for backends where it falls back to the N×N kernel (some MPS
    versions), at a small speed cost. Results are identical up to float summation order."""
    from ..models.unet import CrossAttention

    if size is not None and size < 1:
        raise KilnError(f"attention slice size must be at least 1, got {size}")
    for m in pipe.model.unet.modules():
        if isinstance(m, CrossAttention):
            m.slice_size = size
