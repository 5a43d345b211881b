"""The A1111 prompt language: parser units and properties, chunking of long prompts, emphasis in the encoder."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.prompts import CHUNK, chunk_tokens, parse, token_count
from kiln.tokenizer import BOS, EOS, default_tokenizer

TOK = default_tokenizer()


@pytest.mark.parametrize("text,expected", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("((red))", [("red", pytest.approx(1.21))]),
    ("(red:1.5) circle", [("red", 1.5), (" circle", 1.0)]),
    ("( red : 0.5 )", [(" red ", 0.5)]),
    ("[red]", [("red", pytest.approx(1 / 1.1))]),
    ("[[red]]", [("red", pytest.approx(1 / 1.21))]),
    ("((a) b)", [("a", pytest.approx(1.21)), (" b", pytest.approx(1.1))]),
    ("(a [b] c)", [("a ", pytest.approx(1.1)), ("b", pytest.approx(1.0)), (" c", pytest.approx(1.1))]),
    ("(a:2) (b:2)", [("a", 2.0), (" ", 1.0), ("b", 2.0)]),
    (r"\(literal\) \[x\]", [("(literal) [x]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("time: 5pm", [("time: 5pm", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_examples(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("(unclosed", [("(unclosed", 1.0)]),           # unbalanced brackets are literal text
    ("closed) only", [("closed) only", 1.0)]),
    ("[open", [("[open", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("((a)", [("(", 1.0), ("a", pytest.approx(1.1))]),
    ("(a:1.2.3)", [("(a:1.2.3)", 1.0)]),           # a malformed weight is text, not a crash
    ("a:1.2)", [("a:1.2)", 1.0)]),
    ("(a:)", [("a:", 1.1)]),
])
def test_parse_malformed_is_literal(text, expected):
    assert parse(text) == expected


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c()[]:\\.,1235-+")) | st.characters(), max_size=60))
def test_parse_never_raises_and_keeps_every_letter(text):
    out = parse(text)
    assert out and all(isinstance(t, str) for t, _ in out)
    assert all(w > 0 or (w == -1 and t == "BREAK") for t, w in out)
    letters = lambda s: sorted(c for c in s if c.isalpha())
    kept = "".join(t for t, w in out if w != -1)
    removed = "".join(t for t, w in out if w == -1)
    assert letters(kept + removed) == letters(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["cat", "red", ",", "(", ")", "[", "]", "(x:1.3)", "BREAK", "a", "dog,"]),
                max_size=150).map(" ".join))
def test_chunks_are_always_77_ids_with_bos_and_eos(text):
    chunks = chunk_tokens(TOK, text)
    assert chunks
    for c in chunks:
        assert len(c.ids) == len(c.weights) == CHUNK + 2
        assert c.ids[0] == BOS and EOS in c.ids[1:]
    content = [i for c in chunks for i in c.ids if i not in (BOS, EOS)]
    assert len(content) == token_count(TOK, text)  # every content token lands in exactly one chunk


def test_short_prompt_chunk_equals_plain_tokenization():
    c = chunk_tokens(TOK, "a red circle on a blue background")
    assert len(c) == 1 and c[0].ids == TOK(["a red circle on a blue background"])[0].tolist()
    assert set(c[0].weights) == {1.0}


def test_long_prompt_splits_into_75_token_chunks():
    text = " ".join(["red"] * 200)  # one token each
    chunks = chunk_tokens(TOK, text)
    assert [sum(1 for i in c.ids if i not in (BOS, EOS)) for c in chunks] == [75, 75, 50]


def test_break_and_comma_backtrack():
    assert len(chunk_tokens(TOK, "a red circle BREAK a blue square")) == 2
    words = ["red"] * 70 + [","] + ["blue"] * 10
    chunks = chunk_tokens(TOK, " ".join(words))
    first = [i for i in chunks[0].ids if i not in (BOS, EOS)]
    # the chunk was full at 75; the 4 words after the comma (within 20 tokens) moved to the next chunk
    assert len(first) == 71 and first[-1] == TOK.encode(",")[0]
    assert len(chunk_tokens(TOK, " ".join(words), comma_backtrack=0)[0].ids) == 77
    assert [i for i in chunk_tokens(TOK, " ".join(words), comma_backtrack=0)[0].ids if i not in (BOS, EOS)][-1] != \
        TOK.encode(",")[0]


def test_weights_follow_their_tokens():
    c = chunk_tokens(TOK, "a (red:1.5) [circle]")[0]
    red, circle = TOK.encode("red")[0], TOK.encode("circle")[0]
    assert c.weights[c.ids.index(red)] == 1.5
    assert c.weights[c.ids.index(circle)] == pytest.approx(1 / 1.1)
    assert c.weights[c.ids.index(TOK.encode("a")[0])] == 1.0


# ------------------------------------------------------------------------------------------- in the encoder
def test_unweighted_prompt_encodes_exactly_as_before(pipe):
    ids = TOK(["a red circle on a blue background"]).to(pipe.device)
    plain = pipe.model.text_model(ids)
    assert torch.equal(pipe.encode_prompts(["a red circle on a blue background"]), plain)


def test_emphasis_scales_tokens_and_restores_the_mean(pipe):
    plain = pipe.encode_prompts(["a red circle"])[0]
    weighted = pipe.encode_prompts(["a (red:1.5) circle"])[0]
    red_pos = TOK(["a red circle"])[0].tolist().index(TOK.encode("red")[0])
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), abs=1e-5)
    ratio = (weighted[red_pos] / plain[red_pos]).median().item()
    other = (weighted[1] / plain[1]).median().item()
    assert ratio / other == pytest.approx(1.5, rel=1e-4)


def test_long_prompts_concatenate_and_pad_with_the_empty_prompt(pipe):
    long = " ".join(["red circle"] * 60)  # 120 tokens → 2 chunks
    cond, uncond = (c.context for c in pipe.conditioning([long], [""]))
    assert cond.shape[1] == uncond.shape[1] == 2 * 77
    empty = pipe.encode_prompts([""])[0]
    assert torch.equal(uncond[0, :77], empty) and torch.equal(uncond[0, 77:], empty)
    mixed = pipe.encode_prompts([long, "a"])
    assert torch.equal(mixed[1, 77:], empty)


def test_clip_skip(pipe):
    a = pipe.encode_prompts(["a red circle"], clip_skip=1)
    b = pipe.encode_prompts(["a red circle"], clip_skip=2)
    assert (a - b).abs().mean() > 1e-2
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="clip skip"):
        pipe.encode_prompts(["x"], clip_skip=pipe.cfg.text.layers + 1)


def test_a_200_token_prompt_differs_from_its_first_75_tokens(pipe):
    head = "a red circle on a blue background"
    tail = ", ".join(["a large green star at the top on black"] * 20)
    text = f"{head}, {tail}"
    assert token_count(TOK, text) >= 200
    first75 = TOK.decode(TOK.encode(text)[:75])
    full = pipe.txt2img(text, steps=8, seed=3, cfg_scale=5.0, batch_size=1)
    cut = pipe.txt2img(first75, steps=8, seed=3, cfg_scale=5.0, batch_size=1)
    diff = (full.pixels.astype(int) - cut.pixels.astype(int))
    assert (abs(diff) > 2).mean() > 0.05
