"""`Conv2d` and `Linear` that pre-pack their weight for oneDNN when they run inference on a CPU.

PyTorch's eager CPU convolution reorders the weight into oneDNN's blocked layout on every call. At the small
spatial sizes of a UNet's deep levels that reorder costs more than the arithmetic (SD 1.5, 1280→1280 3×3 at 8×8,
batch 2: 56 ms plain, 21 ms pre-packed on a 2-core EPYC). Inductor's *freezing* packs once; this does the same in
eager mode. The layout oneDNN picks depends on the input shape, so the first call at a shape packs for that shape
and later calls reuse it; a new shape, a changed weight (LoRA merges bump the tensor's version) or another dtype
or device repacks. Only one packed copy per layer is kept. `Linear` does the same for oneDNN's GEMM, which with a
packed weight beats PyTorch's fp32 `linear` (MKL) by 1.1-1.8x on SD's shapes.

Memory: the packed copy is a second copy of the weight. When the dense weight lives in a memory-mapped weights file
(kiln's loader keeps it there), its pages are handed back to the kernel after packing (`MADV_PAGEOUT`; they are
re-read from the file if anything reads the dense weight again), so the process holds the weights once, as before.
That is the default, "auto": fp32 is packed where memory stays flat (Linux, file-backed weights), bf16 always (the
opt-in `--precision autocast` on CPUs with native bf16, where the copy costs half the fp32 size: +1.7 GB for SD 1.5,
for a 1.23x faster UNet step at 256x256). Other weights converted at load (an fp16 file computed in fp32, a pickled
.ckpt) are ordinary memory that cannot be handed back, so "auto" leaves them to PyTorch's path;
`prepack(model, True)` packs them anyway, at the cost of the weights' size (2.4 GB for SD 1.5's convolutions in
fp32); `prepack(model, False)` turns packing off.

Training (gradients on), circular padding (`seamless`), dtypes other than float32 and bfloat16, other devices and
torch.compile take PyTorch's own path.
"""
import ctypes
import mmap
import sys

import torch
from torch import nn

_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_DTYPES = (torch.float32, torch.bfloat16)
_MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim clean file pages now; dirty private pages without swap stay (no loss)
_libc = None


def release_pages(t: torch.Tensor) -> None:
    """Ask the kernel to drop the whole pages under `t` from this process's resident set. Harmless for any memory:
    file-backed clean pages are re-read on the next access, anonymous or written pages are kept."""
    global _libc
    if sys.platform != "linux" or t.device.type != "cpu":
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ps = mmap.PAGESIZE
        start = -(-t.data_ptr() // ps) * ps
        end = (t.data_ptr() + t.numel() * t.element_size()) // ps * ps
        if end > start:
            _libc.madvise(start, end - start, _MADV_PAGEOUT)
    except (OSError, AttributeError):
        pass


def file_backed(t: torch.Tensor) -> bool:
    """Whether `t`'s memory is a mapping of a file (Linux: /proc/self/maps); False where that cannot be told."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= addr < hi:
                    return len(fields) >= 6 and fields[4] != "0"
    except (OSError, ValueError, IndexError):
        pass
    return False


def tensor_version(t: torch.Tensor) -> int:
    """`t`'s in-place modification counter (-1 for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


class PackedWeight:
    """What `Conv2d` and `Linear` share: the weight packed once per input shape, kept while the weight is unchanged."""
    prepack: bool | str = "auto"  # "auto" | True | False, per instance through `prepack(model, mode)`

    def _packable(self, x) -> bool:
        return (_MKLDNN and self.prepack and x.device.type == "cpu" and x.dtype in _DTYPES
                and self.weight.dtype == x.dtype and not (torch.is_grad_enabled() and self.weight.requires_grad)
                and not torch.compiler.is_compiling())

    def _packed_weight(self, shape: tuple, pack):
        """The weight packed by `pack(weight)` for inputs of `shape`; None where this layer takes PyTorch's path."""
        w = self.weight
        if self.prepack == "auto":  # decided once per weight tensor: fp32 only where memory stays flat
            if getattr(self, "_auto", (None,))[0] != w.data_ptr():
                self._auto = (w.data_ptr(), w.dtype == torch.bfloat16 or (sys.platform == "linux" and file_backed(w)))
            if not self._auto[1]:
                return None
        key = (shape, w.data_ptr(), tensor_version(w), w.dtype)
        if getattr(self, "_packed_key", None) != key:
            self._packed = None  # free the old copy before making the new one
            try:
                self._packed = pack(w.detach())
            except RuntimeError:  # a oneDNN build without this layout: use PyTorch's path from now on
                self.prepack = False
                return None
            self._packed_key = key
            release_pages(w)
        return self._packed

    def __getstate__(self):  # copies and pickles carry the weights, not the packed copy
        state = super().__getstate__()
        for k in ("_packed", "_packed_key", "_auto"):
            state.pop(k, None)
        return state


class Conv2d(PackedWeight, nn.Conv2d):
    def forward(self, x):
        packed = None
        if self._packable(x) and self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4:
            packed = self._packed_weight(tuple(x.shape), lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)))
        if packed is None:
            return super().forward(x)
        # The answer is channels-last, and the layers after run channels-last from here on. Converting back to
        # NCHW measured 0.68x diffusers' VAE decode speed instead of 1.02x; the cost is float order only (PyTorch's
        # NHWC group norm sums differently: a tiny VAE decoder's max error from an fp64 run is 6.7e-5, not 1.9e-6;
        # on SD 1.5 the image differs from diffusers' by 1.5e-5 either way).
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")


class Linear(PackedWeight, nn.Linear):
    """oneDNN's packed GEMM: 1.1-1.8x PyTorch's fp32 `linear` (MKL) on SD's shapes on a 2-core EPYC (the gain is
    largest for the deep levels' few rows); the layout depends on the number of rows, hence one pack per shape."""

    def forward(self, x):
        packed = None
        if self._packable(x) and x.dim() >= 2:
            rows = x.numel() // x.shape[-1]
            packed = self._packed_weight((rows,), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def prepack(model: nn.Module, mode: bool | str = True) -> None:
    """Weight pre-packing for every `Conv2d` and `Linear` in `model`: True, False (also frees the packed copies)
    or "auto"."""
    if mode not in (True, False, "auto"):
        raise ValueError(f"prepack must be True, False or 'auto', not {mode!r}")
    for m in model.modules():
        if isinstance(m, PackedWeight):
            m.prepack = mode
            if not mode:
                m._packed, m._packed_key = None, None
