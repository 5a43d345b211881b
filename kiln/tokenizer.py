r"""CLIP byte-pair-encoding tokenizer (openai/clip-vit-large-patch14, as used by SD1).

The merges come from ``kiln/assets/bpe_simple_vocab_16e6.txt.gz`` (open_clip /
OpenAI CLIP, MIT licence, see ``kiln/assets/LICENSE-open_clip.txt``).

Vocabulary (49,408 ids): the 256 byte-level characters, the same 256 with
``</w>`` appended, one token per merge for the first 48,894 merges, then
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

Text handling.  The ids equal those of transformers' CLIP tokenizers; the
installed transformers 5.x has one ``CLIPTokenizer`` (``CLIPTokenizerFast`` is
an alias), backed by the Rust ``tokenizers`` library, the same pipeline as
4.x's ``CLIPTokenizerFast``.  Steps:

1. ``<|startoftext|>`` / ``<|endoftext|>`` written literally (exact case) are
   split off first and give their special ids; the text between them is
   processed on its own.
2. Normalise: Unicode NFC, every run of whitespace -> one space, lower-case
   *character by character* (a word-final capital sigma becomes ``σ``, not
   the ``ς`` that ``str.lower`` gives).  No HTML unescaping (``&amp;`` stays
   ``&amp;``) and no other clean-up: that is what transformers does when ftfy
   is not installed, and kiln does not use ftfy.
3. Pre-tokenise with CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|
   [^\s\p{L}\p{N}]+`` (whitespace dropped).  A piece that is a special string
   (a case variant such as ``<|EndOfText|>``, lower-cased) gives the special
   id.  (The Rust pipeline splits each piece again with GPT-2's byte-level
   pattern; on CLIP's pieces that never changes anything, so it is skipped.)
4. UTF-8 bytes -> byte-level characters, BPE with ``</w>`` on the last symbol
   of each word, ids.  Results are cached per piece.

Checked (tests/test_tokenizer.py, and once against every code point) to be
identical to transformers 5.x ``CLIPTokenizer`` and 4.x ``CLIPTokenizerFast``
for all text made of characters assigned in Unicode 14.0 (Python 3.11's
``unicodedata``; the Rust library's regex and case tables are newer, so
characters added since may differ), with these documented exceptions where
the transformers tokenizers disagree among themselves:

* Case variants of the special strings: 4.x slow, 4.x fast and OpenAI CLIP
  give the special id (as kiln does); 5.x gives ``<|`` ``endoftext`` ``|>``.
  After punctuation (``!<|ENDOFTEXT|>``) 4.x fast still gives the special id,
  while the 4.x slow one and kiln give ``!<|`` ``endoftext`` ``|>``.
* The 4.x *slow* python ``CLIPTokenizer`` without ftfy (text cleaned by
  BERT's BasicTokenizer) differs from all Rust-backed ones, and from kiln:
  - CJK ideographs: it puts spaces round each (``東京`` -> ``東</w> 京</w>``);
    kiln and the fast one keep ``東京`` as one word;
  - characters of category C* (controls, format characters such as the
    zero-width joiner in emoji sequences, private use) other than tab/LF/CR,
    and U+FFFD: it deletes them; kiln keeps them as bytes;
  - ``ΟΔΟΣ``: it lower-cases with ``str.lower`` (final ``ς``);
  - its pattern is case-insensitive, so ``'ſ`` (long s), U+0345 and the
    circled letters U+24B6..24E9 are split differently.
"""

from __future__ import annotations

import functools
import gzip
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import torch

__all__ = ["BOS", "EOS", "Tokenizer", "default_tokenizer"]

BOS, EOS = 49406, 49407
_BOS_TEXT, _EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
_SPECIAL = {_BOS_TEXT: BOS, _EOS_TEXT: EOS}
_N_MERGES = 49152 - 256 - 2  # 48,894: the merges CLIP's vocabulary uses
_VOCAB_SIZE = 49408
_CACHE_SIZE = 100_000  # pieces; cleared when full

_MERGES_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# Literal special tokens, split off before normalisation (exact case).
_SPECIAL_RE = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE_RE = regex.compile(r"\s+")
# CLIP's pre-tokeniser; everything it does not match (whitespace) is dropped.
_CLIP_PIECE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP byte-level BPE (256 entries).

    Printable latin-1 bytes map to themselves; the other 68 bytes map to
    U+0100 onwards, in byte order.  The dict's order (the 188 kept bytes, then
    the 68 others) is the order of the first 256 vocabulary entries.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (kept bytes first) is the vocabulary order


def _load_merges() -> list[tuple[str, str]]:
    with gzip.open(_MERGES_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # lines[0] is the "#version" header.
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{_MERGES_PATH} is not a CLIP BPE merges file")
    return merges  # type: ignore[return-value]


def _lower(text: str) -> str:
    """Per-character lower-casing (no context rules such as final sigma)."""
    if text.isascii():
        return text.lower()
    return "".join(c.lower() for c in text)


class Tokenizer:
    """CLIP BPE tokenizer.  ``pad_id``: EOS for SD1 (transformers), 0 for SD2 (open_clip)."""

    def __init__(self, pad_id: int = EOS):
        if not 0 <= pad_id < _VOCAB_SIZE:
            raise ValueError(f"pad_id must be in [0, {_VOCAB_SIZE}), got {pad_id}")
        self.pad_id = int(pad_id)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        merges = _load_merges()
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        chars = list(self.byte_encoder.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [_BOS_TEXT, _EOS_TEXT]
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        if len(self.encoder) != _VOCAB_SIZE or self.encoder[_EOS_TEXT] != EOS:
            raise RuntimeError("unexpected CLIP vocabulary size")
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        # piece (normalised text, as matched by the pre-tokeniser) -> ids
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # --- encoding -------------------------------------------------------

    def _bpe(self, word: str) -> list[str]:
        """BPE on one byte-level word; ``</w>`` is attached to its last symbol."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            if piece in _SPECIAL:  # a case variant such as "<|EndOfText|>", lower-cased
                return [_SPECIAL[piece]]
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids = [self.encoder[t] for t in self._bpe(word)]
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text``: no BOS/EOS, no truncation."""
        ids: list[int] = []
        for k, segment in enumerate(_SPECIAL_RE.split(text)):
            if k % 2:  # a literal special token
                ids.append(_SPECIAL[segment])
                continue
            if not segment:
                continue
            norm = _lower(_WHITESPACE_RE.sub(" ", unicodedata.normalize("NFC", segment)))
            for piece in _CLIP_PIECE_RE.findall(norm):
                ids.extend(self._encode_piece(piece))
        return ids

    def __call__(self, texts: Sequence[str] | str, max_length: int = 77) -> torch.LongTensor:
        """``[B, max_length]`` int64: BOS + content (cut to ``max_length - 2``) + EOS + padding."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *self.encode(text)[: max_length - 2], EOS]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    # --- decoding -------------------------------------------------------

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of one id sequence (debugging aid).

        A leading BOS is dropped and the sequence ends at the first EOS (what
        follows is padding, whatever ``pad_id`` is); ids without BOS/EOS, as
        returned by :meth:`encode`, decode whole.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if ids and ids[0] == BOS:
            ids = ids[1:]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        data = bytearray()
        for i in ids:
            if i in (BOS, EOS):
                continue
            token = self.decoder[i]
            end_of_word = token.endswith("</w>")
            if end_of_word:
                token = token[:-4]
            data.extend(self.byte_decoder[c] for c in token)
            if end_of_word:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


@functools.lru_cache
def default_tokenizer(pad_id: int = EOS) -> Tokenizer:
    """Shared tokenizer per padding id (EOS: SD 1.x; 0: open_clip's SD 2.x); built once each."""
    return Tokenizer(pad_id)
