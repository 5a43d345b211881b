"""A1111's prompt editing ([from:to:when]), alternation ([a|b]) and composable diffusion (AND): the schedules against
A1111's own parser's, the per-step conditioning the denoiser gets, and what they do to the embedded model's pictures
(judged by the demo analyzer)."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.pipeline import denoiser
from kiln.pipeline.conds import Clock, prompt_conds
from kiln.pipeline.text import Cond
from kiln.prompts import schedule, split_and, text_at_step

CASES = json.loads((Path(__file__).parent / "data" / "a1111_prompt_schedules.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['prompt'][:40]}|{c['steps']}|{c.get('hires_steps')}")
def test_schedule_equals_a1111s(case):
    """Step boundaries and texts equal those of A1111's parser (tests/data/a1111_prompt_schedules.json records its
    output for 127 prompt/steps cases: its doctests, edge cases, nested random prompts, hires-fix passes)."""
    got = schedule(case["prompt"], case["steps"], case.get("hires_steps"))
    assert [list(e) for e in got] == case["schedule"]


def test_the_cases_cover_every_construct():
    prompts = [c["prompt"] for c in CASES]
    assert len(CASES) >= 30
    for needle in ("[a:b:3]", "|", "\\", "(", ".5", ":0.25]", "[[", "::"):
        assert any(needle in p for p in prompts), needle
    assert any("hires_steps" in c for c in CASES)


@pytest.mark.parametrize("prompt,parts", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat :1.5 AND a dog:-0.5", [("a cat", 1.5), (" a dog", -0.5)]),
    ("a cat AND a dog :0", [("a cat", 1.0), (" a dog", 0.0)]),
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
    ("(red:1.2) AND [a:b:3]", [("(red:1.2)", 1.0), (" [a:b:3]", 1.0)]),
    ("time: 5", [("time", 5.0)]),  # as A1111: a trailing ":number" is a weight
])
def test_split_and(prompt, parts):
    assert split_and(prompt) == parts


def test_text_at_step_is_a1111s_lookup():
    sched = schedule("a [b:c:3] d", 10)
    assert sched == [(3, "a b d"), (10, "a c d")]
    assert [sched[text_at_step(sched, k)][1][2] for k in range(11)] == ["b"] * 4 + ["c"] * 7


PROMPT_RED = "a large red circle in the center on a white background"
PROMPT_BLUE = "a large blue circle in the center on a white background"


def _rows(pipe, texts):
    return pipe.conditioning(texts, None)[0].context


def test_each_step_gets_its_texts_and_each_text_is_encoded_once(pipe, monkeypatch):
    from kiln.pipeline import conds as conds_module

    encoded = []
    real = conds_module.conditioning

    def spy(p, prompts, negative, *a, **kw):
        encoded.append((list(prompts), None if negative is None else list(negative)))
        return real(p, prompts, negative, *a, **kw)

    monkeypatch.setattr(conds_module, "conditioning", spy)
    clock = Clock()
    prompt = "a large [red:blue:3] circle in the center on a white background"
    conds = prompt_conds(pipe, [prompt, prompt], "[black:green:0.5] square", 10, guidance=True, clock=clock)
    assert encoded == [([PROMPT_RED, PROMPT_BLUE], ["black square", "green square"])]
    red, blue = _rows(pipe, [PROMPT_RED, PROMPT_BLUE])
    black, green = _rows(pipe, ["black square", "green square"])
    for step in range(10):
        clock.step = step
        mix = conds(None)
        c = mix.cond.context
        assert mix.uncond == [0, 1] and mix.plain
        want_pos, want_neg = (red if step <= 3 else blue), (black if step <= 5 else green)
        torch.testing.assert_close(c[2], want_pos, rtol=0, atol=1e-6)
        torch.testing.assert_close(c[3], want_pos, rtol=0, atol=1e-6)
        torch.testing.assert_close(c[0], want_neg, rtol=0, atol=1e-6)


def test_the_hires_pass_has_its_own_schedule(pipe):
    clock = Clock()
    conds = prompt_conds(pipe, ["a large [red:blue:1.5] circle"], "", 10, guidance=False, clock=clock,
                         hires_steps=8)
    red, blue = _rows(pipe, ["a large red circle", "a large blue circle"])
    seen = []
    for step in range(8):
        clock.step = step
        c = conds(None).cond.context[0]
        seen.append("red" if torch.equal(c, red) else "blue" if torch.equal(c, blue) else "?")
    assert seen == ["red"] * 5 + ["blue"] * 3  # 1.5: half way through the hires pass (A1111 1.6+)


def test_and_brings_the_negative_prompt_even_at_cfg_1(pipe):
    clock = Clock()
    plain = prompt_conds(pipe, ["a red circle"], "", 4, guidance=False, clock=clock)(None)
    assert plain.uncond is None and plain.cond.context.shape[0] == 1
    mix = prompt_conds(pipe, ["a red circle AND a blue square :0.5", "a cat"], "", 4, guidance=False,
                       clock=clock)(None)
    assert mix.uncond == [0, 1] and not mix.plain
    assert mix.parts == [[(2, 1.0), (3, 0.5)], [(4, 1.0)]]
    assert mix.sources.tolist() == [0, 1, 0, 0, 1]


def test_combine_is_a1111s_weighted_sum_of_guidance_deltas(pipe):
    mix = prompt_conds(pipe, ["a AND b :0.5", "c"], "", 4, guidance=True)(None)
    out = torch.randn(5, 4, 8, 8)
    got = mix.combine(out, 7.0)
    u0, u1, a, b, c = out
    torch.testing.assert_close(got[0], u0 + 7.0 * ((a - u0) + 0.5 * (b - u0)))
    torch.testing.assert_close(got[1], u1 + 7.0 * (c - u1))


def test_inpainting_channels_follow_each_row_to_its_image():
    seen = {}

    def call(x, t, c):
        seen["x"] = x
        return x[:, :4]

    extra = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 5, 2, 2)
    rows = torch.zeros(5, 4, 2, 2)
    denoiser.with_channels(call, extra)(rows, None, Cond(torch.zeros(5, 1, 1), None, torch.tensor([0, 1, 0, 0, 1])))
    assert seen["x"][:, 4, 0, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------- on the embedded model
SEEDS = 20


_RUNS = {}


def _colors(pipe, prompt):
    """(the analyzer's shape colours, the pixels) of 20 seeds of `prompt` (each prompt generated once per module)."""
    from kiln.demo.evaluate import analyze

    if prompt not in _RUNS:
        r = pipe.txt2img(prompt, steps=20, sampler="ddim", cfg_scale=5.0, seed=0, batch_size=SEEDS, watermark=False)
        _RUNS[prompt] = Counter(analyze(px).color for px in r.pixels), r.pixels
    return _RUNS[prompt]


@pytest.mark.parametrize("when,color", [(0.1, "blue"), (2, "blue"), (0.8, "red"), (16, "red")])
def test_prompt_editing_switches_the_colour(pipe, when, color):
    """An early switch gives blue circles, a late one red ones (A1111: the colour is settled in the first steps)."""
    counts, _ = _colors(pipe, f"a large [red:blue:{when}] circle in the center on a white background")
    assert counts[color] >= 0.9 * SEEDS, counts


def test_alternation_differs_from_both_of_its_parts(pipe):
    counts, alt = _colors(pipe, "a large [red|blue] circle in the center on a white background")
    red_counts, red = _colors(pipe, PROMPT_RED)
    blue_counts, blue = _colors(pipe, PROMPT_BLUE)
    assert red_counts["red"] >= 0.9 * SEEDS and blue_counts["blue"] >= 0.9 * SEEDS
    assert counts["red"] + counts["blue"] <= 0.5 * SEEDS, counts  # mostly a blend: purple
    for other in (red, blue):
        moved = (np.abs(alt.astype(int) - other.astype(int)).max(axis=-1) > 24).mean()
        assert moved > 0.05, moved


def test_and_with_weight_0_equals_the_other_side_alone(pipe):
    _, alone = _colors(pipe, PROMPT_RED)
    _, both = _colors(pipe, PROMPT_RED + " AND a small green star on the left on a black background :0")
    assert np.abs(alone.astype(int) - both.astype(int)).max() <= 1
    counts, _ = _colors(pipe, PROMPT_RED + " AND " + PROMPT_BLUE)
    assert counts["red"] + counts["blue"] <= 0.5 * SEEDS, counts  # both guide: a blend again


def test_rows_split_into_as_few_calls_as_memory_allows():
    """On running out of GPU memory, the batched rows go through in halves (and halves of those) — same output."""
    calls = []

    def call(x, t, c):
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("too many rows")
        return x * 2 + c.context[:, :1, :1, None]

    x = torch.randn(5, 4, 2, 2)
    c = Cond(torch.arange(5.0).view(5, 1, 1), None, torch.tensor([0, 1, 0, 0, 1]))
    out = denoiser.call_rows(call, x, 1.0, c, "cpu")
    torch.testing.assert_close(out, x * 2 + torch.arange(5.0).view(5, 1, 1, 1))
    assert calls == [5, 2, 3, 1, 2]
