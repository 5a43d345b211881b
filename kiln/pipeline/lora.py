"""LoRA stage: LoRA files merged into the loaded weights for a batch, and removed exactly afterwards."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KilnError


def load_lora(pipe, name_or_path):
    """A LoRA by file path, or by name in `pipe.lora_dir` (read once, then cached)."""
    from ..checkpoints.lora import LORA_SUFFIXES, find_lora, read_lora

    p = Path(str(name_or_path))
    path = p if p.suffix in LORA_SUFFIXES and p.is_file() else find_lora(str(name_or_path), pipe.lora_dir)
    key = str(path.resolve())
    if key not in pipe._lora_cache:
        lora = read_lora(path, [k for k, _ in pipe.model.named_parameters()], pipe.cfg.unet.num_res_blocks)
        if lora.unmatched:
            pipe.notices.append(f"LoRA {lora.name}: {len(lora.unmatched)} of its modules match no layer of "
                                f"this model and were ignored")
        pipe._lora_cache[key] = lora
    return pipe._lora_cache[key]


@torch.no_grad()
def set_loras(pipe, loras) -> None:
    """Merge [(Lora, text-encoder weight, UNet weight)] into the weights: W + w · alpha/rank · up @ down.
    The previous set is removed first by restoring the original tensors (exact: no subtraction drift), so
    requests never leak LoRAs into each other."""
    from ..checkpoints.lora import TE_PREFIXES

    want = tuple((lora.path, float(te), float(unet)) for lora, te, unet in loras)
    if want == pipe._lora_applied:
        return
    params = dict(pipe.model.named_parameters())
    for key, original in pipe._lora_backup.items():
        params[key].copy_(original)
    pipe._lora_backup, pipe._lora_applied = {}, ()
    for lora, te, unet in loras:
        for patch in lora.patches:
            w = te if patch.key.startswith(TE_PREFIXES) else unet
            if w == 0:
                continue
            p = params[patch.key]
            if patch.key not in pipe._lora_backup:
                pipe._lora_backup[patch.key] = p.detach().to("cpu", copy=True)
            target = p if patch.rows is None else p[patch.rows[0]:patch.rows[1]]
            target.add_((patch.delta(target.shape, torch.float32, p.device) * w).to(p.dtype))
    pipe._lora_applied = want
    if pipe.frozen:  # compiled graphs hold the old weights as constants
        from .runtime import reset_compiled

        reset_compiled()


def apply_networks(pipe, batch: list[str], loras) -> tuple[list[str], dict]:
    """The batch's prompts without LoRA tags, with the LoRAs they name (and `loras`, [(file or name, weight)])
    merged in; the infotext field naming them. Tags are read from the batch's first prompt."""
    from ..prompts import extract_networks

    cleaned, tags = [], None
    for p in batch:
        try:
            text, found = extract_networks(p)
        except ValueError as e:
            raise KilnError(str(e)) from None
        cleaned.append(text)
        tags = found if tags is None else tags
    specs = [(load_lora(pipe, n), w, w) for n, w in (loras or [])]
    specs += [(load_lora(pipe, n), te, unet) for n, te, unet in tags or []]
    set_loras(pipe, specs)
    if not specs:
        return cleaned, {}
    return cleaned, {"Lora hashes": ", ".join(f"{lora.name}: {lora.short_hash}" for lora, _, _ in specs)}
