"""Text stage: prompts in A1111's language → the UNet's conditioning (cross-attention context, SDXL's vector)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KilnError
from ..prompts import CHUNK, chunk_tokens


@dataclass
class Cond:
    """Text conditioning: the cross-attention context [B, n, C] and, for SDXL, the UNet's vector input [B, adm];
    in a model call, `images` [B] says which image of the batch each row denoises (for per-image inputs such as an
    inpainting model's extra channels; None: row i is image i)."""
    context: torch.Tensor
    vector: torch.Tensor | None = None
    images: torch.Tensor | None = None
    prompt_rows: torch.Tensor | None = None  # [B] 1 for a prompt's rows, 0 for a negative prompt's (None: all 1)


@torch.no_grad()
def encode_prompts_pooled(pipe, prompts: list[str], clip_skip: int = 1, used: dict | None = None):
    """Prompts in A1111's language → ([B, 77·chunks, C] hidden states, pooled [B, P] or None).

    Each 75-token chunk is encoded on its own; emphasis multiplies the chunk's hidden states and then restores
    their mean (A1111's "Original" emphasis). Prompts with fewer chunks are padded with the empty prompt's.
    SDXL: the two encoders' states are concatenated (768 + 1280), and the pooled embedding (of each prompt's
    first chunk, as A1111) comes from the last encoder. The textual-inversion embeddings the prompts use are
    added to `used` ({name: Embedding})."""
    cfg = pipe.cfg
    if clip_skip < 1 or clip_skip > pipe.max_clip_skip:
        raise KilnError(f"clip skip must be between 1 and {pipe.max_clip_skip}, got {clip_skip}")
    if cfg.text.max_position != CHUNK + 2:
        raise KilnError(f"the text encoder has {cfg.text.max_position} positions; prompts need {CHUNK + 2}")
    table, extras, owners = embedding_table(pipe)
    skip, final_norm = clip_skip - 1 + cfg.text_skip, cfg.text_final_norm
    states, pooled, per_prompt = [], None, None
    for k, (encoder, tok) in enumerate(zip(pipe.model.text_models, pipe.tokenizers)):
        try:  # the same chunks for every encoder; only the padding id may differ
            per_prompt = [chunk_tokens(tok, p, embeddings=table) for p in prompts]
        except ValueError as e:
            raise KilnError(str(e)) from None
        flat = [c for chunks in per_prompt for c in chunks]
        ids = torch.tensor([c.ids for c in flat], device=pipe.device)
        extra = extras.get(encoder.cfg.width)
        if cfg.is_sdxl and k == len(pipe.tokenizers) - 1:
            z, pool = encoder.hidden_and_pooled(ids, skip, final_norm, extra=extra)
            firsts = np.cumsum([0] + [len(c) for c in per_prompt[:-1]])
            pooled = pool[torch.as_tensor(firsts, device=pool.device)]
        else:
            z = encoder(ids, skip=skip, final_norm=final_norm, extra=extra)
        states.append(z)
    z = torch.cat(states, dim=-1)  # `flat`: the last encoder's chunks (the same for every encoder but padding)
    if used is not None:
        used.update({owners[i].name: owners[i] for c in flat for i in c.ids if i in owners})
    out, i = [], 0
    for chunks in per_prompt:
        out.append(torch.cat([_emphasis(c, zc) for c, zc in zip(chunks, z[i:i + len(chunks)])]))
        i += len(chunks)
    return pad_chunks(pipe, out, clip_skip), pooled


def _emphasis(chunk, z):
    if all(w == 1.0 for w in chunk.weights):
        return z
    mean = z.float().mean()
    z = z * torch.tensor(chunk.weights, device=z.device, dtype=z.dtype)[:, None]
    return z * (mean / z.float().mean()).to(z.dtype)


def pad_chunks(pipe, hidden: list[torch.Tensor], clip_skip: int, length: int | None = None) -> torch.Tensor:
    """Stack prompts' states, padding the shorter ones with the empty prompt's chunk up to `length` tokens."""
    length = length or max(h.shape[0] for h in hidden)
    if all(h.shape[0] == length for h in hidden):
        return torch.stack(hidden)
    empty = encode_prompts_pooled(pipe, [""], clip_skip)[0][0]
    return torch.stack([torch.cat([h] + [empty] * ((length - h.shape[0]) // empty.shape[0])) for h in hidden])


def embedding_table(pipe):
    """Textual-inversion embeddings in `pipe.embeddings_dir` for `chunk_tokens`: ({name's token ids: the ids of
    its vectors (past the vocabulary)}, the vectors [n, width], {id: Embedding}). Files are read once (re-read
    when they change); embeddings of another width (another model family) are skipped with a notice."""
    from ..checkpoints.embeddings import scan

    if not pipe.embeddings_dir:
        return None, {}, {}
    widths, offset = pipe.cfg.context_widths, pipe.cfg.text.vocab_size
    table, vectors, owners = {}, {w: [] for w in widths}, {}
    for path in scan(pipe.embeddings_dir):
        emb = _read_embedding(pipe, path, widths)
        if emb is None or not all(w in emb.vectors for w in widths):
            continue
        n = len(emb.vectors[widths[0]])
        if any(len(emb.vectors[w]) != n for w in widths):
            continue
        ids = list(range(offset, offset + n))
        offset += n
        table[tuple(pipe.tokenizer.encode(emb.name))] = ids
        for w in widths:
            vectors[w].append(emb.vectors[w])
        owners.update({i: emb for i in ids})
    extras = {w: torch.cat(v).to(pipe.device, pipe.dtype) for w, v in vectors.items() if v}
    return table, extras, owners


def _read_embedding(pipe, path, widths):
    """An embedding file, read once per change of the file; None (with a notice) when it cannot be used."""
    from ..checkpoints.embeddings import read_embedding
    from ..errors import CheckpointError

    key = (str(path), path.stat().st_mtime_ns)
    if key not in pipe._emb_cache:
        try:
            pipe._emb_cache[key] = read_embedding(path)
        except CheckpointError as e:
            pipe.notices.append(str(e))
            pipe._emb_cache[key] = None
        emb = pipe._emb_cache[key]
        if emb is not None and not all(w in emb.vectors for w in widths):
            pipe.notices.append(f"embedding {emb.name}: made for text encoders of width "
                                f"{'/'.join(map(str, emb.vectors))}, this model's are "
                                f"{'/'.join(map(str, widths))}: skipped")
    return pipe._emb_cache[key]


def conditioning(pipe, prompts: list[str], negative: list[str] | None, clip_skip: int = 1,
                 size: tuple[int, int] | None = None, aesthetic: tuple[float, float] = (6.0, 2.5),
                 used: dict | None = None):
    """(cond, uncond) `Cond`s with a common sequence length (uncond None when guidance is off). SDXL also gets
    its vector conditioning for an image of `size` = (width, height) (default: native), uncropped; the refiner
    its aesthetic scores (positive, negative), diffusers' and A1111's defaults. Embeddings used: see
    `encode_prompts_pooled`."""
    cond, pooled = encode_prompts_pooled(pipe, prompts, clip_skip, used)
    w, h = size or (pipe.native_size, pipe.native_size)
    vec = lambda pool, score: None if pool is None else vector_conditioning(pipe, pool, h, w, aesthetic=score)
    if negative is None:
        return Cond(cond, vec(pooled, aesthetic[0])), None
    uncond, upooled = encode_prompts_pooled(pipe, negative, clip_skip, used)
    n = max(cond.shape[1], uncond.shape[1])
    return (Cond(pad_chunks(pipe, list(cond), clip_skip, n), vec(pooled, aesthetic[0])),
            Cond(pad_chunks(pipe, list(uncond), clip_skip, n), vec(upooled, aesthetic[1])))


def vector_conditioning(pipe, pooled, height: int, width: int, crop=(0, 0), target=None, aesthetic=6.0):
    """SDXL's `y`: pooled text ⊕ sinusoidal embeddings (256 each, cos first) of the original size (h, w), the
    crop's top-left corner and the target size (base) or the aesthetic score (refiner)."""
    from ..models.unet import timestep_embedding

    tail = [aesthetic] if pipe.cfg.text2 is None else list(target or (height, width))
    values = torch.tensor([height, width, *crop, *tail], dtype=torch.float32, device=pooled.device)
    emb = timestep_embedding(values, 256).reshape(1, -1).to(pooled.dtype)
    return torch.cat([pooled, emb.expand(pooled.shape[0], -1)], dim=-1)
