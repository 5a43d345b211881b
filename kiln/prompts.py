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


# ------------------------------------------------------------------------------------------ prompt schedules
# A1111's prompt editing, parsed as its grammar does (modules/prompt_parser.py), by recursive descent:
#   [from:to:when]  [to:when]  [from::when]   from → to after step `when`
#   [a|b|c]                                   one option per step, cycling (empty options allowed)
# `when` with a "." is a fraction of the steps, without one a step number. Brackets that form none of these stay
# text (emphasis is read later, per scheduled text); a prompt the grammar rejects (a "|" outside brackets, a
# trailing backslash) is used as it is, unscheduled, as in A1111.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")


class _Unparsable(Exception):
    pass


@dataclass
class _Edit:  # [before:after:when]; before None when absent
    before: list | None
    after: list
    when: str


@dataclass
class _Alternate:  # [a|b|…]
    options: list


def _parse_seq(s: str, i: int, top: bool = False) -> tuple[list, int]:
    """Text and constructs from i. Inside a bracket (`top` False) it stops at a character it cannot take; the whole
    prompt (`top`) keeps stray brackets and colons as text and is `_Unparsable` at any other such character."""
    out = []
    while i < len(s):
        m = _PLAIN.match(s, i)
        if m:
            out.append(m.group(0))
            i = m.end()
            continue
        node = _parse_bracket(s, i) if s[i] in "[(" else None
        if node is not None:
            out.append(node[0])
            i = node[1]
        elif not top:
            break
        elif s[i] in "[]():":
            out.append(s[i])
            i += 1
        else:  # "|" outside brackets, or a backslash ending the prompt
            raise _Unparsable
    return out, i


def _parse_bracket(s: str, i: int):
    """(node, end) for the construct opening at s[i] ("(" or "["), or None when none is there."""
    first, j = _parse_seq(s, i + 1)
    nxt = s[j] if j < len(s) else ""
    if s[i] == "(":  # emphasis: kept as text, its inside may hold schedules
        if nxt == ")":
            return ["(", first, ")"], j + 1
        if nxt == ":":
            second, k = _parse_seq(s, j + 1)
            if k < len(s) and s[k] == ")":
                return ["(", first, ":", second, ")"], k + 1
        return None
    if nxt == "]":
        return ["[", first, "]"], j + 1
    if nxt == "|":
        options = [first]
        while j < len(s) and s[j] == "|":
            option, j = _parse_seq(s, j + 1)
            options.append(option)
        return (_Alternate(options), j + 1) if j < len(s) and s[j] == "]" else None
    if nxt == ":":
        m = _NUMBER.match(s, j + 1)
        if m:
            return _Edit(None, first, m.group(1)), m.end()
        second, k = _parse_seq(s, j + 1)
        m = _NUMBER.match(s, k + 1) if k < len(s) and s[k] == ":" else None
        if m:
            return _Edit(first, second, m.group(1)), m.end()
    return None


def _walk(tree, fn):
    for node in tree:
        if isinstance(node, _Edit):
            fn(node)
            _walk(node.before or [], fn)
            _walk(node.after, fn)
        elif isinstance(node, _Alternate):
            fn(node)
            for option in node.options:
                _walk(option, fn)
        elif isinstance(node, list):
            _walk(node, fn)


def _text_at(tree, step: int, whens: dict) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_text_at(node.before or [], step, whens) if step <= whens[id(node)]
                       else _text_at(node.after, step, whens))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, whens))
        else:
            out.append(_text_at(node, step, whens))
    return "".join(out)


def schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The prompt's texts over a pass of `steps` steps: [(last step, text)], ascending, the last at `steps`; a
    sampler at step k (from 0) uses the first entry with k <= its last step (A1111's schedule, boundaries and all).
    With `hires_steps`, the schedule of the hires-fix pass that follows a first pass of `steps` steps: a step number
    counts on from the first pass, a fraction from 1.0 (A1111's default since 1.6)."""
    int_offset, float_offset, n = (0, 0.0, steps) if hires_steps is None else (steps, 1.0, hires_steps)
    try:
        tree, _ = _parse_seq(prompt, 0, top=True)
    except _Unparsable:
        return [(n, prompt)]
    ends, whens = {n}, {}

    def collect(node):
        if isinstance(node, _Alternate):
            ends.update(range(1, n + 1))
            return
        v = float(node.when)
        v = (v - float_offset) * n if "." in node.when else v - int_offset
        whens[id(node)] = min(n, int(v))
        if whens[id(node)] >= 1:
            ends.add(whens[id(node)])

    _walk(tree, collect)
    return [(end, _text_at(tree, end, whens)) for end in sorted(ends)]


def text_at_step(sched: list[tuple[int, str]], step: int) -> int:
    """The index of the entry of `schedule` a sampler uses at `step` (from 0); past the end, the last."""
    for k, (end, _) in enumerate(sched):
        if step <= end:
            return k
    return len(sched) - 1


# Composable diffusion: "a cat AND a dog :0.5" — each part guides the image, with its weight (A1111's regexes).
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The sub-prompts of a prompt joined by AND, each with its weight (1 unless it ends in ":number")."""
    parts = []
    for part in _AND.split(prompt):
        m = _PART_WEIGHT.search(part)
        text, weight = m.groups() if m else (part, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
