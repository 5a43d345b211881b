"""The shipped demo ControlNet (kiln/assets/demo_controlnet.safetensors) against its targets, on the 44 held-out
cases of `kiln eval demo-controlnet` (DDIM 20 steps, scale 5; prompts name the colors, not the shape): shape and
position follow the control image in ≥ 85%, color follows the prompt in ≥ 95%, and without the ControlNet position
agrees at chance (1 in 5). Also the file's layout and the ways users reach it."""

import numpy as np
from safetensors import safe_open

from kiln.checkpoints.controlnet import load_controlnet
from kiln.demo import control_report
from kiln.demo.control_report import EMBEDDED_CONTROLNET


def test_the_file_is_a_small_controlnet_in_lllyasviels_layout():
    assert EMBEDDED_CONTROLNET.stat().st_size <= 10 * 2 ** 20
    with safe_open(str(EMBEDDED_CONTROLNET), "pt") as f:
        assert all(k.startswith("control_model.") for k in f.keys())
        assert "kiln_training" in f.metadata()
    net = load_controlnet(EMBEDDED_CONTROLNET)
    assert net.cfg.hint_channels == 3


def test_the_embedded_demo_controlnet_meets_its_targets(pipe):
    got = control_report.adherence(pipe, EMBEDDED_CONTROLNET)
    assert got["n"] == 44
    assert got["shape"] >= 0.85 and got["position"] >= 0.85, got
    assert got["color"] >= 0.95 and got["background"] >= 0.95, got
    plain = control_report.adherence(pipe, None)
    assert plain["position"] <= 0.35, plain  # chance: 5 positions


def test_cli_controlnet_demo_names_it(tmp_path):
    from PIL import Image

    from kiln.cli import main

    case = control_report.cases(1)[0]
    case.control.save(tmp_path / "edges.png")
    base = ["txt2img", "--prompt", case.prompt, "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "8",
            "--no-watermark"]
    assert main(base + ["--outdir", str(tmp_path / "a"), "--controlnet", "demo", "--control-image",
                        str(tmp_path / "edges.png")]) == 0
    assert main(base + ["--outdir", str(tmp_path / "b")]) == 0
    a, b = (Image.open(tmp_path / d / "samples" / "00000.png") for d in "ab")
    assert 'Model: demo_controlnet [' in a.text["parameters"]
    assert (np.abs(np.asarray(a, int) - np.asarray(b, int)).max(-1) > 8).mean() > 0.05
