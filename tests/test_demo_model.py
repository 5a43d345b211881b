"""The embedded demo model: loaded by the ordinary loader, the default of `kiln txt2img`, and faithful to prompts
it never saw in training, as judged by the pixel analyzer."""
import numpy as np
import pytest
from PIL import Image

import kiln
from kiln.cli import main
from kiln.demo.report import EMBEDDED, adherence


@pytest.fixture(scope="module")
def demo():
    return kiln.load(EMBEDDED, device="cpu", precision="full")


def test_embedded_model_is_small_and_an_ordinary_checkpoint(demo):
    assert EMBEDDED.stat().st_size <= 25e6
    assert demo.cfg.family == "sd1" and demo.native_size == 64 and demo.cfg.downscale == 4


@pytest.fixture(scope="module")
def scores(demo):
    return {scale: adherence(demo, sampler="ddim", cfg_scale=scale, steps=20, seed=0) for scale in (1.0, 5.0)}


def test_heldout_adherence_at_scale_5(scores):
    # Measured with the shipped weights (docs/demo-model.md): color 100%, background 100%, shape 90.9%,
    # position 100% (44 held-out prompts, DDIM 20, seed 0); the thresholds:
    s = scores[5.0]
    print("scale 5:", {k: round(v, 3) for k, v in s.items()})
    assert s["color"] >= 0.95 and s["background"] >= 0.95 and s["shape"] >= 0.85 and s["position"] >= 0.85


def test_guidance_makes_it_more_faithful(scores):
    # Measured: scale 1 color 70.5%, background 90.9%, shape 86.4%, position 95.5%, all 50.0%; scale 5 as above,
    # all 90.9%. The shipped weights mix in a fine-tune that saw wrong color words in a quarter of its captions (as
    # web captions are), so the unguided model is unsure of colors, as real SD is without guidance. Before that
    # (the 5,400-step model) scale 1 got 95.5 / 100 / 93.2 / 100 and only color was lower.
    guided, plain = scores[5.0], scores[1.0]
    print("scale 1:", {k: round(v, 3) for k, v in plain.items()})
    assert all(plain[k] < guided[k] for k in ("color", "background", "shape", "position"))
    assert plain["color"] < guided["color"] - 0.2 and plain["all"] < guided["all"] - 0.25


def test_txt2img_without_ckpt_uses_the_embedded_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["txt2img", "--prompt", "a yellow star on a purple background", "--n_samples", "2", "--n_iter", "1",
                 "--ddim_steps", "20", "--scale", "5"]) == 0
    out = tmp_path / "outputs" / "txt2img-samples"
    assert "embedded demo model" in capsys.readouterr().err
    from kiln.demo.evaluate import analyze

    for name in ("00000.png", "00001.png"):
        img = np.asarray(Image.open(out / "samples" / name))
        assert img.shape == (64, 64, 3)
        assert analyze(img).shape != "none"  # a shape on a background, not noise or a flat field
    assert (out / "grid-0000.png").exists()


def test_ddim_and_plms_at_50_steps_agree_on_a_trained_model(demo):
    prompts = [p for p, _ in __import__("kiln.demo.shapes", fromlist=["x"]).heldout_prompts()[:4]]
    ddim = demo.txt2img(prompts, steps=50, sampler="ddim", cfg_scale=5, seed=11, batch_size=4).pixels.astype(float)
    plms = demo.txt2img(prompts, steps=50, sampler="plms", schedule="normal", cfg_scale=5, seed=11,  # CompVis' grid
                        batch_size=4).pixels.astype(float)
    other_seed = demo.txt2img(prompts, steps=50, sampler="ddim", cfg_scale=5, seed=99,
                              batch_size=4).pixels.astype(float)
    same, different = np.abs(ddim - plms).mean(), np.abs(ddim - other_seed).mean()
    print(f"mean |DDIM50 - PLMS50| = {same:.2f}/255, another seed: {different:.2f}/255")
    assert same < 6.0 and same < different / 3
