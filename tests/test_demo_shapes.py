"""The captioned-shapes dataset (kiln.demo.shapes) and its pixel evaluator (kiln.demo.evaluate)."""
import itertools
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from kiln.demo import evaluate as E
from kiln.demo import shapes as S

ATTRS = ("color", "background", "shape", "position", "size")


@pytest.fixture(scope="module")
def dataset():
    """1200 jittered images: 800 from "train", 400 from "heldout"."""
    return S.sample(800, seed=11, split="train") + S.sample(400, seed=12, split="heldout")


def _noisy(img, rng, sigma=8.0):
    return np.clip(np.rint(img + rng.normal(0.0, sigma, img.shape)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ dataset
def test_vocabulary_and_palette():
    assert list(S.COLORS) == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    assert S.SHAPES == ("circle", "square", "triangle", "star")
    assert set(S.POSITIONS) == {"left", "right", "top", "bottom", "center"} and set(S.SIZES) == {"small", "large"}
    rgb = np.array(list(S.COLORS.values()), dtype=float)
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 70  # well separated (closest: orange / yellow, 76)


def test_render_shape_dtype_and_determinism():
    lab = S.Labels("red", "star", "blue", "left", "small")
    a, b = S.render(lab), S.render(lab)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    j1 = S.render(lab, np.random.default_rng(1))
    assert np.array_equal(j1, S.render(lab, np.random.default_rng(1)))
    assert not np.array_equal(j1, S.render(lab, np.random.default_rng(2)))
    # plain background: the corners are exactly the background color, and the shape color appears
    assert (a[0, 0] == S.COLORS["blue"]).all() and (a[-1, -1] == S.COLORS["blue"]).all()
    assert (a.reshape(-1, 3) == S.COLORS["red"]).all(axis=1).sum() > 50
    # antialiased: some edge pixels are neither color
    assert ((a.reshape(-1, 3) != S.COLORS["red"]).any(1) & (a.reshape(-1, 3) != S.COLORS["blue"]).any(1)).sum() > 10
    with pytest.raises(ValueError):
        S.Labels("red", "circle", "red", "center", "small")
    with pytest.raises(ValueError):
        S.Labels("red", "hexagon", "blue", "center", "small")


def test_every_shape_fits_with_margin():
    for shape, pos in itertools.product(S.SHAPES, S.POSITIONS):
        lab = S.Labels("white", shape, "black", pos, "large")
        for seed in range(20):
            img = S.render(lab, np.random.default_rng(seed))
            border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
            assert (border == S.COLORS["black"]).all(), (shape, pos, seed)


def test_sample_determinism():
    a, b = S.sample(40, seed=3), S.sample(40, seed=3)
    c = S.sample(40, seed=4)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] and x[2] == y[2] for x, y in zip(a, b))
    assert [x[1] for x in a] != [x[1] for x in c]
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    # a prefix of a longer draw
    longer = S.sample(60, seed=3)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, longer))
    h1, h2 = S.sample(20, seed=3, split="heldout"), S.sample(20, seed=3, split="heldout")
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(h1, h2))
    assert S.heldout_prompts() == S.heldout_prompts()
    with pytest.raises(ValueError):
        S.sample(1, seed=0, split="test")


def test_held_out_combos_and_splits():
    held = S.held_out_combos()
    combos = S.all_combos()
    assert len(combos) == 224 and len(set(combos)) == 224
    assert held <= set(combos) and 18 <= len(held) <= 26  # ~10%
    train = [t for t in combos if t not in held]
    for i, vocab in ((0, S.COLORS), (1, S.SHAPES), (2, S.COLORS)):
        assert {t[i] for t in train} == set(vocab)
    assert {t[1] for t in held} == set(S.SHAPES)

    tr = S.sample(1000, seed=5, split="train")
    assert all(lab.combo not in held for _, _, lab in tr)
    assert {lab.color for _, _, lab in tr} == set(S.COLORS)
    assert {lab.background for _, _, lab in tr} == set(S.COLORS)
    assert {lab.shape for _, _, lab in tr} == set(S.SHAPES)
    assert {lab.position for _, _, lab in tr} == set(S.POSITIONS)
    assert {lab.size for _, _, lab in tr} == set(S.SIZES)
    ho = S.sample(300, seed=5, split="heldout")
    assert all(lab.combo in held for _, _, lab in ho)
    assert len({lab.combo for _, _, lab in ho}) == len(held)


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


_WHERE_WORD = {"center": "center", "left": "left", "right": "right", "top": "top", "bottom": "bottom"}


def test_captions(dataset):
    templates = set()
    for _, text, lab in dataset:
        w = _words(text)
        assert {lab.color, lab.shape, lab.background} <= w, text
        assert {"color", "shape", "background"} <= lab.stated
        assert ("size" in lab.stated) == (lab.size in w), text
        assert ("position" in lab.stated) == (_WHERE_WORD[lab.position] in w), text
        assert not (set(S.SIZES) - {lab.size}) & w and not (set(S.POSITIONS) - {lab.position}) & w, text
        assert not (set(S.SHAPES) - {lab.shape}) & w, text
        assert not (set(S.COLORS) - {lab.color, lab.background}) & w, text
        assert " a o" not in text and not text.startswith("a o"), text  # "an orange"
        templates.add(re.sub("|".join(list(S.COLORS) + list(S.SHAPES) + list(S.SIZES) + list(S.POSITIONS)), "_",
                             text))
    assert len(templates) >= 8
    # the shape color is named before the background color, or the background is marked as such
    rng = np.random.default_rng(0)
    lab = S.Labels("black", "circle", "white", "top", "large")
    for _ in range(50):
        text = S.caption(lab, rng)
        assert text.index("black") < text.index("white") or "white background" in text or "white image" in text


def test_mislabel_changes_each_stated_attribute_at_the_given_rate(dataset):
    rng = np.random.default_rng(5)
    labels = [lab for _, _, lab in dataset]
    changed = {a: 0 for a in ATTRS}
    stated = {a: 0 for a in ATTRS}
    for lab in labels * 3:
        wrong = S.mislabel(lab, 0.2, rng)
        assert wrong.stated == lab.stated and wrong.color != wrong.background
        for a in ATTRS:
            differs = getattr(wrong, a) != getattr(lab, a)
            assert a in lab.stated or not differs, (a, lab, wrong)  # what a caption doesn't state stays
            stated[a] += a in lab.stated
            changed[a] += differs
    rates = {a: changed[a] / stated[a] for a in ATTRS}
    assert all(abs(r - 0.2) < 0.03 for r in rates.values()), rates
    lab = labels[0]
    assert S.mislabel(lab, 0.0, rng) == lab
    every = S.mislabel(lab, 1.0, rng)
    assert all(getattr(every, a) != getattr(lab, a) for a in lab.stated)


def test_mislabel_takes_a_probability_per_attribute(dataset):
    rng = np.random.default_rng(6)
    p = {"color": 0.5, "background": 0.5, "shape": 0.0, "position": 0.0, "size": 0.0}
    changed = {a: 0 for a in ATTRS}
    for _, _, lab in dataset:
        wrong = S.mislabel(lab, p, rng)
        for a in ATTRS:
            changed[a] += getattr(wrong, a) != getattr(lab, a)
    assert changed["shape"] == changed["position"] == changed["size"] == 0
    assert abs(changed["color"] / len(dataset) - 0.5) < 0.06 and abs(changed["background"] / len(dataset) - 0.5) < 0.06


def test_color_jitter_spreads_colors_but_keeps_them_nearest_their_name():
    rng = np.random.default_rng(0)
    for name, rgb in S.COLORS.items():
        got = np.array([S.jittered_color(name, 0.45, rng) for _ in range(300)], dtype=float)
        assert {E.nearest_color(c) for c in got} == {name}
        d = np.linalg.norm(got - np.array(rgb, dtype=float), axis=1)
        assert d.max() <= 0.45 * S.PALETTE_GAP[name] + 1  # +1: rounding to integers
        assert np.median(d) > 0.25 * S.PALETTE_GAP[name] * (0.5 if name in ("white", "black") else 1)  # clipped ones
    assert min(S.PALETTE_GAP.values()) == pytest.approx(76.3, abs=0.1)  # yellow and orange


def test_color_jittered_samples_keep_their_labels_and_geometry():
    plain, jittered = S.sample(300, seed=9), S.sample(300, seed=9, color_jitter=0.4)
    assert [c for _, c, _ in plain] != [c for _, c, _ in jittered]  # the jitter draws shift the caption stream
    assert E.score([(img, lab) for img, _, lab in jittered])["all"] == 1.0
    corners = {}  # the top-left pixel is always background
    for img, _, lab in jittered:
        corners.setdefault(lab.background, []).append(tuple(img[0, 0]))
    assert all(len(set(v)) >= 0.9 * len(v) for v in corners.values()), corners  # nearly every one its own shade
    assert {tuple(img[0, 0]) for img, _, lab in plain if lab.background == "red"} == {S.COLORS["red"]}
    again = S.sample(300, seed=9, color_jitter=0.4)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(jittered, again))


def test_caption_stating_states_exactly_the_labels_stated(dataset):
    rng = np.random.default_rng(6)
    for _, _, lab in dataset[:300]:
        text = S.caption_stating(lab, rng)
        w = _words(text)
        assert {lab.color, lab.shape, lab.background} <= w, text
        assert ("size" in lab.stated) == (lab.size in w), text
        assert ("position" in lab.stated) == (_WHERE_WORD[lab.position] in w), text
    with pytest.raises(ValueError, match="no template"):
        S.caption_stating(S.Labels("red", "star", "blue", "left", "small", stated=frozenset({"color"})), rng)


def test_heldout_prompts():
    prompts = S.heldout_prompts()
    held = S.held_out_combos()
    assert 40 <= len(prompts) <= 80
    assert {lab.combo for _, lab in prompts} == set(held)
    assert len({(text, lab) for text, lab in prompts}) == len(prompts)
    for text, lab in prompts:
        w = _words(text)
        assert {lab.color, lab.shape, lab.background, lab.size, _WHERE_WORD[lab.position]} <= w, text
        assert lab.stated == frozenset(ATTRS)
    assert {lab.position for _, lab in prompts} == set(S.POSITIONS)
    assert {lab.size for _, lab in prompts} == set(S.SIZES)
    assert E.score([(S.render(lab), lab) for _, lab in prompts])["all"] == 1.0


# ----------------------------------------------------------------------------------------------------- analyzer
def test_analyzer_exact_on_canonical_renders():
    combos = [("red", "circle", "orange"), ("orange", "square", "red"), ("blue", "triangle", "purple"),
              ("purple", "star", "blue"), ("white", "star", "yellow"), ("yellow", "triangle", "white"),
              ("black", "square", "green"), ("green", "circle", "black"), ("white", "circle", "black"),
              ("black", "star", "white"), ("red", "triangle", "purple"), ("green", "square", "blue")]
    pairs = [(S.render(S.Labels(c, s, b, p, z)), S.Labels(c, s, b, p, z))
             for c, s, b in combos for p in S.POSITIONS for z in S.SIZES]
    acc = E.score(pairs)
    assert acc == {k: 1.0 for k in (*ATTRS, "all")}, acc


def test_analyzer_accuracy_clean_and_noisy(dataset):
    clean = E.score([(img, lab) for img, _, lab in dataset])
    rng = np.random.default_rng(0)
    noisy = E.score([(_noisy(img, rng), lab) for img, _, lab in dataset[::2]])  # 600: 400 train, 200 heldout
    for k in ATTRS:
        assert clean[k] >= 0.99, (k, clean)
        assert noisy[k] >= 0.97, (k, noisy)
    print(f"\nclean {clean}\nnoisy(sigma=8) {noisy}")


def test_analyzer_mild_blur_and_other_sizes(dataset):
    sub = dataset[::6]
    blurred = [(np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0))), lab) for img, _, lab in sub]
    acc = E.score(blurred)
    assert all(acc[k] >= 0.97 for k in ATTRS), acc
    sub = dataset[::20]
    for size in (128, 48):
        resized = [(np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)), lab)
                   for img, _, lab in sub]
        acc = E.score(resized)
        assert all(acc[k] >= 0.95 for k in ATTRS), (size, acc)
    img, _, lab = sub[0]
    assert E.analyze(img.astype(np.float32) / 255.0).shape == lab.shape  # float [0, 1] input


def test_analyzer_no_shape():
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(S.COLORS["green"], np.uint8)
    a = E.analyze(blank)
    assert (a.background, a.shape, a.color, a.position, a.size) == ("green", "none", "none", "none", "none")
    a = E.analyze(_noisy(blank, np.random.default_rng(0)))
    assert a.background == "green" and a.shape == "none"


def test_score_only_stated():
    lab = S.Labels("red", "square", "blue", "left", "small", stated=frozenset({"color", "shape", "background"}))
    wrong_place = S.render(S.Labels("red", "square", "blue", "right", "large"))
    full = E.score([(wrong_place, lab)])
    assert full["position"] == 0.0 and full["size"] == 0.0 and full["all"] == 0.0 and full["color"] == 1.0
    part = E.score([(wrong_place, lab)], only_stated=True)
    assert np.isnan(part["position"]) and np.isnan(part["size"]) and part["all"] == 1.0 and part["shape"] == 1.0
