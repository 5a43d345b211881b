"""The A1111 prompt language: emphasis weights, BREAK, and prompts longer than CLIP's 75-token window.

    (word)  ×1.1     ((word))  ×1.21     (word:1.3)  ×1.3     [word]  ÷1.1     \\( \\) \\[ \\]  literal brackets
    BREAK   starts a new 75-token chunk

Unlike A1111, an opening bracket that is never closed (or a closing one never opened) is kept as literal text
and weights nothing: a typo cannot silently re-weight the rest of a prompt. A malformed weight such as
`(a:1.2.3)` is literal text too. Parsing never raises.

Long prompts: tokens are packed into chunks of 75 (each later wrapped as BOS + 75 + EOS = 77 ids); when a chunk
fills up and a comma occurred within its last 20 tokens, the words after that comma move to the next chunk
(A1111's "prompt word wrap length limit"). Each chunk is encoded separately and the hidden states are
concatenated along the sequence axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .tokenizer import BOS, EOS

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK = 75
COMMA_BACKTRACK = 20

_TOKEN = re.compile(r"""
\\[()\[\]\\]          # escaped bracket or backslash
|\\                   # a lone backslash
|\(|\[                # openers
|:\s*([+-]?[.\d]+)\s*\)   # weight then closer
|\)|\]                # closers
|[^\\()\[\]:]+        # text
|:                    # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """Text pieces with their weights; a BREAK is the piece ("BREAK", -1). Adjacent pieces of equal weight merge."""
    res: list[list] = []           # [text, weight, is_open_bracket]
    stacks = {"(": [], "[": []}     # index of each open bracket's placeholder in res, per bracket kind

    def close(opener: str, factor: float, literal: str) -> None:
        if stacks[opener]:
            at = stacks[opener].pop()
            res[at][0], res[at][2] = "", False   # the bracket was syntax, not text
            for piece in res[at + 1:]:
                if piece[1] != -1:
                    piece[1] *= factor
        else:
            res.append([literal, 1.0, False])

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            res.append([tok[1], 1.0, False])
        elif tok in ("(", "["):
            stacks[tok].append(len(res))
            res.append([tok, 1.0, True])
        elif weight is not None:
            try:
                factor = float(weight)
            except ValueError:
                factor = None
            if factor is None or not stacks["("]:
                res.append([tok, 1.0, False])
            else:
                close("(", factor, tok)
        elif tok == ")":
            close("(", ROUND, ")")
        elif tok == "]":
            close("[", SQUARE, "]")
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", -1, False])
                res.append([part, 1.0, False])
    # Unclosed openers stay as literal text at weight 1 (their placeholder already holds the bracket).
    out: list[tuple[str, float]] = []
    for t, w, _ in res:
        if t == "" and w != -1:
            continue
        if out and w != -1 and out[-1][1] == w and out[-1][0] != "BREAK":
            out[-1] = (out[-1][0] + t, w)
        else:
            out.append((t, w))
    return out or [("", 1.0)]


@dataclass
class Chunk:
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _units(tokens: list[int], embeddings: dict | None):
    """Token ids grouped into what must stay together: one id, or the ids standing for an embedding's vectors
    (`embeddings`: name's token ids (tuple) → its ids; longest names matched first, as A1111)."""
    if not embeddings:
        return [[t] for t in tokens]
    by_first = {}
    for name_ids, ids in embeddings.items():
        by_first.setdefault(name_ids[0], []).append((name_ids, ids))
    for v in by_first.values():
        v.sort(key=lambda e: -len(e[0]))
    units, i = [], 0
    while i < len(tokens):
        for name_ids, ids in by_first.get(tokens[i], ()):
            if tuple(tokens[i:i + len(name_ids)]) == name_ids:
                units.append(list(ids))
                i += len(name_ids)
                break
        else:
            units.append([tokens[i]])
            i += 1
    return units


def chunk_tokens(tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings: dict | None = None
                 ) -> list[Chunk]:
    """The prompt as chunks of exactly 77 ids (BOS, 75 content-or-padding, EOS) with per-token weights.
    `embeddings` (see `_units`) replaces textual-inversion names by their vectors' ids, never split over chunks."""
    bos, eos, pad = BOS, EOS, tokenizer.pad_id
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def finish():
        nonlocal chunk, last_comma
        fill = CHUNK - len(chunk.ids)
        chunk.ids = [bos] + chunk.ids + [eos] + [pad] * fill
        chunk.weights = [1.0] + chunk.weights + [1.0] * (fill + 1)
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in parse(text):
        if piece == "BREAK" and weight == -1:
            finish()
            continue
        for unit in _units(tokenizer.encode(piece), embeddings):
            tok = unit[0]
            if tok == comma and len(unit) == 1:
                last_comma = len(chunk.ids)
            elif (comma_backtrack and len(chunk.ids) == CHUNK and last_comma != -1
                  and len(chunk.ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_ids, moved_w = chunk.ids[cut:], chunk.weights[cut:]
                chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
                finish()
                chunk.ids, chunk.weights = moved_ids, moved_w
            if len(chunk.ids) + len(unit) > CHUNK:
                if len(unit) > CHUNK:
                    raise ValueError(f"an embedding of {len(unit)} vectors does not fit a {CHUNK}-token chunk")
                finish()
            chunk.ids.extend(unit)
            chunk.weights.extend([weight] * len(unit))
    if chunk.ids or not chunks:
        finish()
    return chunks


def token_count(tokenizer, text: str) -> int:
    """Content tokens of a prompt (what A1111's UI counter shows), brackets and weights excluded."""
    return sum(len(tokenizer.encode(p)) for p, w in parse(text) if w != -1)


# A1111's extra networks: <lora:name>, <lora:name:weight>, <lora:name:te_weight:unet_weight> (also <lyco:…>)
_NETWORK = re.compile(r"<(lora|lyco):([^:<>]+)(?::([^:<>]*))?(?::([^:<>]*))?>")


def extract_networks(text: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(the prompt without its LoRA tags, [(name, text-encoder weight, UNet weight)]), as A1111 reads them.
    A weight that is not a number is an error (ValueError names the tag)."""
    found = []

    def take(m):
        name = m[2].strip()
        try:
            te = float(m[3]) if m[3] not in (None, "") else 1.0
            unet = float(m[4]) if m[4] not in (None, "") else te
        except ValueError:
            raise ValueError(f"{m[0]}: the weight must be a number") from None
        found.append((name, te, unet))
        return ""

    return _NETWORK.sub(take, text), found
