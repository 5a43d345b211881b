"""kiln.tokenizer against transformers' CLIP tokenizers, built offline from the merges we ship.

transformers is a dev dependency: if it cannot be imported this module errors (it is not skipped).

Oracles.  transformers 5.x has a single CLIPTokenizer, backed by the Rust ``tokenizers`` library
(``CLIPTokenizerFast`` is an alias of it).  transformers 4.x has the python ("slow") CLIPTokenizer and
the Rust-backed CLIPTokenizerFast.  Every distinct class available is an oracle here.

Where the oracles disagree with each other (measured over every assigned code point, and on the cases
below) kiln follows the majority of OpenAI CLIP / 4.x slow / 4.x fast / 5.x:

* 4.x slow without ftfy (BERT BasicTokenizer clean-up) vs every Rust-backed one:
  - CJK ideographs get spaces round them in the slow one: "東京" -> 東</w> 京</w> (slow) vs 東京</w> (fast);
  - control/format/private-use/unassigned characters (category C*, except tab/LF/CR) and U+FFFD are
    deleted by the slow one (e.g. the ZWJ inside "👨‍👩‍👧", or "a\\x00b" -> "ab"), kept as bytes by the fast one;
  - final capital sigma: slow uses str.lower ("ΟΔΟΣ" -> "οδος"), fast lower-cases per character ("οδοσ");
  - the slow pre-tokeniser is case-insensitive, so "'ſ" (long s), U+0345 and circled letters Ⓐ.. differ.
  kiln follows the fast one on all of these.
* Case variants of the special strings ("<|ENDOFTEXT|>"): 4.x slow and 4.x fast (and OpenAI CLIP) give
  the special id, 5.x gives six ordinary tokens (its special tokens are matched before lower-casing).
  kiln gives the special id, like 4.x slow; after punctuation ("!<|ENDOFTEXT|>") 4.x fast still gives
  the special id while 4.x slow and kiln do not.  Such strings are excluded from the oracle comparisons
  and pinned in test_special_token_strings.
* Characters unassigned in Unicode 14.0 (Python 3.11's unicodedata) may differ: the Rust library's
  regex and case tables are of newer Unicode versions.  Generated text avoids them.
"""

from __future__ import annotations

import gzip
import json
import random
import time
import unicodedata
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.tokenizer import BOS, EOS, Tokenizer, default_tokenizer

MERGES_GZ = Path(__file__).resolve().parents[1] / "kiln" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


# --- oracles -----------------------------------------------------------------------------------


def _write_hf_files(folder: Path) -> None:
    """vocab.json (49,408 entries) + merges.txt, built independently of kiln.tokenizer."""
    merges = gzip.open(MERGES_GZ, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in kept] + [chr(256 + i) for i in range(256 - len(kept))]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + list(SPECIAL)
    assert len(tokens) == len(set(tokens)) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    _write_hf_files(folder)
    return folder


def _load(cls, folder: Path):
    # from_pretrained on a local folder: offline, and the one spelling that works in 4.x and 5.x
    # (5.x's CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores the files).
    tok = cls.from_pretrained(
        str(folder), local_files_only=True, model_max_length=77,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tok.pad_token_id == EOS and tok.unk_token_id == EOS
    return tok


@pytest.fixture(scope="session")
def oracles(hf_dir) -> dict:
    """name -> transformers tokenizer, one per distinct class (1 in transformers 5, 2 in 4.x)."""
    out = {}
    for name in ("CLIPTokenizer", "CLIPTokenizerFast"):
        cls = getattr(transformers, name)
        if any(type(t) is cls for t in out.values()):
            continue
        out[name] = _load(cls, hf_dir)
    return out


@pytest.fixture(scope="session")
def fast_oracle(oracles):
    """The Rust-backed tokenizer (5.x CLIPTokenizer / 4.x CLIPTokenizerFast)."""
    (tok,) = [t for t in oracles.values() if t.is_fast]
    return tok


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer()


# --- which texts an oracle is expected to agree on ------------------------------------------------

_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _case_variant_special(text: str) -> bool:
    """Does lower-casing create a special string that is not there in exact case?"""
    low = "".join(c.lower() for c in text)
    return any(low.count(s) > text.count(s) for s in SPECIAL)


def _slow_only_divergence(text: str) -> bool:
    """Text on which the python (4.x) CLIPTokenizer is known to differ from the Rust one (see top)."""
    for c in text:
        cp = ord(c)
        if (unicodedata.category(c).startswith("C") and c not in "\t\n\r") or cp == 0xFFFD:
            return True
        if any(lo <= cp <= hi for lo, hi in _CJK) or c in "Σſ\u0345" or 0x24B6 <= cp <= 0x24E9:
            return True
    return False


def _comparable(oracle, text: str) -> bool:
    if _case_variant_special(text):
        return False
    return oracle.is_fast or not _slow_only_divergence(text)


# --- test texts ------------------------------------------------------------------------------

FIXED = [
    "",
    " ",
    "\t\n  \r\n",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, (ultra detailed:1.2), [blurry], ((sharp focus)), 8k, photorealistic",
    "portrait of a woman, by greg rutkowski and alphonse mucha, trending on artstation, 4k, hdr",
    "(((cute))) cat::2 dog::-0.5 | {red|blue} <lora:foo:0.8> embedding:bar",
    "don't stop, it's what they're doing; we've, I'm, you'll, he'd",
    "DON'T IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "'s 't 're 've 'm 'll 'd ''s '''",
    "3.14159 1,000,000 2024-01-31 12:30pm #1 $9.99 50% 1e-3 0x1F 10x10",
    "hello!!! what??? ... --- ___ *** ~~~ ``` ''' \"\"\" ,,, ;;; ::",
    "tabs\there\tand\nnewlines\n\nand   spaces    and\r\nwindows",
    "  leading and trailing whitespace  ",
    "café crème brûlée naïve résumé über straße Größe",
    "CAFÉ CRÈME ÜBER STRASSE GRÖSSE ẞ",
    "cafe\u0301 e\u0301le\u0300ve",  # decomposed accents (NFC composes them)
    "Привет мир, Москва ЗИМОЙ",
    "Ελληνικά γράμματα αβγ",
    "東京 tokyo 北京 漢字 日本語のテキスト ひらがな カタカナ",
    "한국어 텍스트 서울",
    "مرحبا بالعالم עברית",
    "हिन्दी ภาษาไทย",
    "emoji 😀🎨🔥 ❤️ 👍🏽 🇯🇵 ✨✨✨",
    "👨‍👩‍👧 family (with zero-width joiners)",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp; &copy; AT&T",
    "html <b>bold</b> <a href='x'>link</a>",
    "ﬁne ﬂow ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "İstanbul ǅ ǈ ǋ Ωmega ℃ ℉ № ™ ®",
    "\u00a0non\u00a0breaking\u2003em\u2009thin\u3000ideographic\u2028line\u2029para",
    "x\u200by zero-width space, soft\u00adhyphen",
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|startoftext|>b<|endoftext|>c",
    "x <|endoftext|><|endoftext|> y",
    "<|endoftext <|startof text|> |endoftext|>",
    "e<|endoftext|>\u0301x",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    "ab " * 120,
    "1234567890" * 12,
    "!" * 50 + "?" * 50,
    ", ".join(["highly detailed"] * 40),
    " ".join(f"word{i}" for i in range(100)),
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore.",
]

_WORDS = ["a", "photo", "of", "cat", "dog", "astronaut", "horse", "mars", "highly", "detailed", "painting",
          "by", "greg", "rutkowski", "trending", "artstation", "octane", "render", "unreal", "engine", "bokeh",
          "cinematic", "lighting", "hyperrealistic", "cyberpunk", "steampunk", "fantasy", "landscape", "the",
          "xyzzy", "qwertyuiop", "zzz", "aaaaaa", "wow"]
_UNICODE = ["é", "ü", "ß", "Straße", "東京", "漢字", "Москва", "привет", "日本", "😀", "🎨", "❤️", "👍🏽",
            "naïve", "Ωmega", "ñandú", "Ærø", "ĳ", "ǅ", "한국", "ภาษา"]
_PUNCT = [",", ".", "!", "?", ":", ";", "(", ")", "[", "]", "{", "}", "<", ">", "|", "/", "\\", "-", "_", "'",
          '"', "*", "+", "=", "&", "#", "@", "$", "%", "^", "~", "`", "::", "((", "))", "...", "--"]
_ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&copy;"]
_SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\r\n", "\u00a0", "\u3000"]


def _generated(n: int = 300, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)

    def word() -> str:
        kind = rng.random()
        if kind < 0.45:
            w = rng.choice(_WORDS)
            r = rng.random()
            return w.upper() if r < 0.15 else w.capitalize() if r < 0.3 else w
        if kind < 0.6:
            return rng.choice(_UNICODE)
        if kind < 0.75:
            return "".join(rng.choice(_PUNCT) for _ in range(rng.randint(1, 3)))
        if kind < 0.85:
            return str(rng.choice([rng.randint(0, 9), rng.randint(10, 99999), round(rng.uniform(0, 2), 2)]))
        if kind < 0.9:
            return rng.choice(_ENTITIES)
        if kind < 0.95:
            return f"({rng.choice(_WORDS)}:{rng.uniform(0.5, 1.5):.1f})"
        return rng.choice(_WORDS) + rng.choice(["'s", "'t", "'re", "'ll", "'d", "'m", "'ve", "'S"])

    out = []
    for _ in range(n):
        length = rng.choice([1, 2, 5, 10, 20, 40, 80])  # 40 and 80 words usually exceed 75 tokens
        parts = []
        for i in range(length):
            if i:
                parts.append(rng.choice(_SPACES) if rng.random() < 0.3 else rng.choice([" ", ", ", ","]))
            parts.append(word())
        out.append("".join(parts))
    return out


TEXTS = FIXED + _generated()


def _oracle_ids(oracle, texts, max_length=77) -> list[list[int]]:
    return oracle(list(texts), padding="max_length", max_length=max_length, truncation=True).input_ids


# --- tests -----------------------------------------------------------------------------------


def test_construction_is_fast():
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        Tokenizer()
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"Tokenizer() took {best:.3f} s"


def test_vocabulary(tok):
    assert tok.vocab_size == 49408
    assert tok.encoder["<|startoftext|>"] == BOS == 49406
    assert tok.encoder["<|endoftext|>"] == EOS == 49407
    assert tok.encoder["!"] == 0 and tok.encoder["a"] == 64 and tok.encoder["a</w>"] == 320
    # the first merge ("i n") is id 512, the 48,894th and last ("jeky ll</w>") is 49405
    assert tok.encoder["in"] == 512 and tok.encoder["jekyll</w>"] == 49405
    # well-known SD1 ids
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_default_tokenizer_is_shared():
    a, b = default_tokenizer(), default_tokenizer()
    assert a is b and a.pad_id == EOS


@pytest.mark.parametrize("name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_batch_matches_transformers(tok, oracles, name):
    if name not in oracles:  # transformers 5: CLIPTokenizerFast is CLIPTokenizer, checked once
        assert getattr(transformers, name) is type(oracles["CLIPTokenizer"])
        return
    oracle = oracles[name]
    texts = [t for t in TEXTS if _comparable(oracle, t)]
    assert len(texts) > (300 if oracle.is_fast else 200)  # the python one skips CJK, controls, ...
    ours = tok(texts)
    assert ours.dtype == torch.int64 and ours.shape == (len(texts), 77)
    expected = _oracle_ids(oracle, texts)
    mismatches = [(t, o, e) for t, o, e in zip(texts, ours.tolist(), expected) if o != e]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"
    # untruncated content ids too
    for text in texts:
        assert tok.encode(text) == oracle(text, add_special_tokens=False).input_ids, text


def test_other_max_length(tok, fast_oracle):
    texts = [t for t in TEXTS[:60] if _comparable(fast_oracle, t)]
    for max_length in (2, 3, 10, 100):
        assert tok(texts, max_length=max_length).tolist() == _oracle_ids(fast_oracle, texts, max_length)


_ALPHABET = st.characters(blacklist_categories=("Cs", "Cn"))  # Cn: unassigned in Python's Unicode 14
_PIECES = st.sampled_from(["a", "Photo", "CAT", " ", "  ", "\t", "\n", ",", "(", ")", ":1.2", "'s", "'T", "é",
                           "ß", "東京", "Ж", "😀", "&amp;", "1", "42", "!", "...", "\u00a0", "<|endoftext|>"])
_TEXT = st.one_of(st.text(_ALPHABET, max_size=60),
                  st.lists(st.one_of(_PIECES, st.text(_ALPHABET, max_size=4)), max_size=40).map("".join))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT)
def test_property_matches_transformers(tok, fast_oracle, text):
    if _case_variant_special(text):
        return
    ids = tok.encode(text)
    assert ids == fast_oracle(text, add_special_tokens=False).input_ids
    row = tok([text])[0].tolist()
    assert row == _oracle_ids(fast_oracle, [text])[0]
    n = min(len(ids), 75)
    assert row[0] == BOS and row[1 : n + 1] == ids[:n] and row[n + 1] == EOS
    assert all(i == EOS for i in row[n + 1 :])


def test_shapes_and_truncation(tok):
    texts = ["", "a cat", "a " * 200, ", ".join(["highly detailed"] * 40)]
    ids = tok(texts)
    assert ids.shape == (4, 77) and ids.dtype == torch.int64
    assert (ids[:, 0] == BOS).all()
    assert ids[0].tolist() == [BOS] + [EOS] * 76
    for row, text in zip(ids[2:], texts[2:]):
        assert len(tok.encode(text)) > 75
        assert row[-1] == EOS and (row[1:-1] != EOS).all()
        assert row[1:-1].tolist() == tok.encode(text)[:75]
    assert tok([]).shape == (0, 77)
    assert tok("a cat").tolist() == tok(["a cat"]).tolist()  # a bare string is one prompt
    with pytest.raises(ValueError):
        tok(["a"], max_length=1)


def test_pad_id_zero(tok):
    sd2 = Tokenizer(pad_id=0)
    texts = ["", "a photo of a cat!$", "a " * 200]
    eos_padded, zero_padded = tok(texts), sd2(texts)
    for row_eos, row_zero, text in zip(eos_padded.tolist(), zero_padded.tolist(), texts):
        end = row_zero.index(EOS)
        assert end == min(len(tok.encode(text)), 75) + 1
        assert row_zero[: end + 1] == row_eos[: end + 1]
        assert row_zero[end + 1 :] == [0] * (76 - end)
    # "!" inside a word is id 0: content zeros stay, decode stops at the first EOS
    assert tok.encode("a photo of a cat!$") == [320, 1125, 539, 320, 2368, 0, 259]
    assert zero_padded[1].tolist()[:9] == [BOS, 320, 1125, 539, 320, 2368, 0, 259, EOS]
    assert sd2.decode(zero_padded[1]) == "a photo of a cat !$"
    with pytest.raises(ValueError):
        Tokenizer(pad_id=49408)


def test_decode_round_trip(tok):
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(200):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 12))]
        text = " ".join(words)
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok([text])[0]) == text
    assert tok.decode([]) == ""
    assert tok.decode(Tokenizer(pad_id=0)(["hello world"])[0]) == "hello world"
    assert tok.decode(tok.encode("Café, 東京 😀")) == "café , 東京 😀"


def test_no_html_unescape_or_ftfy(tok):
    # without ftfy transformers does not unescape entities; neither do we
    ids = tok.encode("AT&amp;T &lt;3")
    assert ids == [536, 261, 6259, 282, 339, 261, 3333, 282, 274]
    assert tok.decode(ids) == "at & amp ; t & lt ; 3"
    assert ids != tok.encode("AT&T <3")


def test_special_token_strings(tok, oracles, fast_oracle):
    # exact-case special strings map to the special ids in every transformers version
    for text, expected in [("<|endoftext|>", [EOS]), ("<|startoftext|>", [BOS]),
                           ("a<|startoftext|>b<|endoftext|>c", [320, BOS, 321, EOS, 322]),
                           ("!<|endoftext|>", [256, EOS])]:
        assert tok.encode(text) == expected
        for oracle in oracles.values():
            assert oracle(text, add_special_tokens=False).input_ids == expected
    # case variants: special id when the pre-tokeniser isolates them (OpenAI CLIP, transformers 4.x
    # slow and fast); transformers 5.x gives "<|", "endoftext", "|>" instead -- see the module docstring
    assert tok.encode("a<|ENDOFTEXT|>b") == [320, EOS, 321]
    assert tok.encode("<|EndOfText|>x") == [EOS, 343]
    assert tok.encode("x<|StartOfText|>") == [343, BOS]
    assert tok.encode("!<|ENDOFTEXT|>") == [0, 27, 347, 40786, 4160, 91, 285]  # "!<|" "endoftext" "|>"
    slow = [o for o in oracles.values() if not o.is_fast]
    for text in ["a<|ENDOFTEXT|>b", "<|EndOfText|>x", "x<|StartOfText|>", "!<|ENDOFTEXT|>"]:
        for oracle in slow:
            assert tok.encode(text) == oracle(text, add_special_tokens=False).input_ids
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert fast_oracle("a<|ENDOFTEXT|>b", add_special_tokens=False).input_ids == [
            320, 27, 347, 40786, 4160, 91, 285, 321]
