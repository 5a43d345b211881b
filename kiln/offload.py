"""`--medvram` and `--lowvram`: the weights live in CPU memory and only the part that runs is on the GPU.

A1111's two modes, with the same meaning:
- **medvram**: one of text encoder(s), UNet, VAE encoder, VAE decoder on the device at a time (about the UNet's size
  of device memory: 1.7 GB in fp16 for SD 1.5; a little slower: each part crosses the bus once per image).
- **lowvram**: the UNet too is split, into its time embedding, each input block, the middle block, each output
  block and the output layer; one of those on the device at a time (a few hundred MB; much slower: the UNet crosses
  the bus every step).

Every submodule of a part gets a forward pre-hook that brings its part onto the device and sends the previous
one back, so any call into a part (a `forward`, `vae.encode`, `hidden_and_pooled`) finds its weights in place.
Sending back costs no copy: the CPU tensors are kept and re-attached, unless the weights changed on the device
(a LoRA merge, the fp16 VAE's fp32 fallback), which are then copied back. Modules outside every part (the VAE's
1×1 quant convolutions) stay on the device.
"""
import torch
from torch import nn

from .models.conv import tensor_version

MODES = ("medvram", "lowvram")


def _tensors(module):
    """(module, its parameter or buffer table, name, tensor) for every tensor under `module`."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is not None:
                    yield m, table, name, t


def _moved(t, device):
    """`t` on `device`; a Parameter stays a Parameter (a new one: the CPU one is kept as it is)."""
    out = t.detach().to(device, non_blocking=True)
    if out.data_ptr() == t.data_ptr() and out.device == t.device:
        return t
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


class Offloader:
    def __init__(self, parts: list[nn.Module], device: torch.device):
        self.parts, self.device = parts, torch.device(device)
        self.resident: nn.Module | None = None
        self.loads = 0  # parts moved onto the device so far
        self._cpu: dict[int, list] = {}
        self._handles = []
        for part in parts:
            for m in part.modules():
                self._handles.append(m.register_forward_pre_hook(lambda mod, args, part=part: self.bring(part)))

    def add(self, part: nn.Module) -> None:
        """One more part, kept in CPU memory until it runs (a ControlNet loaded for a generation)."""
        self.parts.append(part)
        for m in part.modules():
            self._handles.append(m.register_forward_pre_hook(lambda mod, args, part=part: self.bring(part)))

    def bring(self, part: nn.Module) -> None:
        if self.resident is part:
            return
        if self.resident is not None:
            self.send_back(self.resident)
        kept = []
        for _m, table, name, cpu in _tensors(part):
            moved = _moved(cpu, self.device)
            if moved is not cpu:
                table[name] = moved
                kept.append((table, name, cpu, moved, tensor_version(moved)))
        self._cpu[id(part)] = kept
        self.resident, self.loads = part, self.loads + 1

    def send_back(self, part: nn.Module) -> None:
        for table, name, cpu, moved, version in self._cpu.pop(id(part), []):
            now = table[name]
            unchanged = now is moved and tensor_version(now) == version
            table[name] = cpu if unchanged else _moved(now, "cpu")  # changed on the device: copy it back
        if self.resident is part:
            self.resident = None

    def remove(self) -> None:
        """Back to ordinary: every part on the device, no hooks."""
        for h in self._handles:
            h.remove()
        if self.resident is not None:
            self.send_back(self.resident)
        for part in self.parts:
            part.to(self.device)
        self._handles, self.parts = [], []


def unet_blocks(unet) -> list[nn.Module]:
    blocks = [unet.time_embed] + ([unet.label_emb] if hasattr(unet, "label_emb") else [])
    return blocks + list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks) + [unet.out]


def offload(model, device, mode: str) -> Offloader:
    """Keep `model` (a LatentDiffusion on the CPU) in CPU memory and run each part on `device` (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"offload mode must be one of {MODES}, not {mode!r}")
    parts = list(model.text_models)
    parts += unet_blocks(model.unet) if mode == "lowvram" else [model.unet]
    parts += [model.vae.encoder, model.vae.decoder]
    inside = {id(t) for part in parts for *_, t in _tensors(part)}
    for _m, table, name, t in _tensors(model):  # the rest (quant convs) is small: it stays on the device
        if id(t) not in inside:
            table[name] = _moved(t, device)
    return Offloader(parts, device)
