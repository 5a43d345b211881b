"""The demo ControlNet: its trainer (initialisation as Zhang et al., a few steps, resume, export and load), the
evaluation cases and judge, and the CLI's refusals. The shipped weights' targets: tests/test_demo_controlnet_shipped.py
(when weights ship)."""
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kiln.checkpoints.controlnet import load_controlnet
from kiln.demo import control_report, shapes
from kiln.demo.evaluate import analyze
from kiln.demo.train_controlnet import ControlTrainer, ControlTrainOptions, edge_map, hints

FAST = ControlTrainOptions(images=16, steps=3, batch=4, save_every=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("cn")
    t = ControlTrainer(work, FAST, progress=False, log=lambda m: None)
    start = {k: v.clone() for k, v in t.net.state_dict().items()}
    t.run(work / "cn.safetensors")
    return t, work, start


def test_the_controlnet_starts_as_a_copy_of_the_encoder_with_zero_outputs(trained):
    t, _, start = trained
    unet = t.base.unet.state_dict()
    copied = [k for k in start if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")]
    assert copied and all(torch.equal(start[k], unet[k].half().float()) for k in copied)
    zeroed = [k for k in start if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14."))]
    assert len(zeroed) == 2 * (len(t.net.zero_convs) + 2) and all(not start[k].any() for k in zeroed)
    # the rest of the hint block: Gaussian (He-normal) weights, zero biases; fp16 in the file the trainer starts from
    w = start["input_hint_block.0.weight"]
    assert abs(w.std().item() - (2 / w[0].numel()) ** 0.5) < 0.15 * (2 / w[0].numel()) ** 0.5
    assert not start["input_hint_block.0.bias"].any()


def test_a_few_steps_train_and_export_a_loadable_fp16_file(trained):
    t, work, start = trained
    assert [s for s, _ in t.loss_log] == [1, 2, 3] and all(math.isfinite(v) for _, v in t.loss_log)
    assert any(not torch.equal(v, start[k]) for k, v in t.net.state_dict().items())
    out = work / "cn.safetensors"
    assert out.stat().st_size <= 10e6
    with safe_open(str(out), "pt") as f:
        assert all(k.startswith("control_model.") and f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        assert '"hint_channels": 3' in f.metadata()["kiln_config"] and "train_seconds" in f.metadata()["kiln_training"]
    net = load_controlnet(out)
    assert net.cfg == t.net.cfg  # the loader builds the layout the trainer trained, attention heads included
    ref = t.net.half().float().eval()
    x, ctx, t_ = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64), torch.tensor([10, 900])
    hint = hints(np.stack([edge_map(im) for im, _, _ in shapes.sample(2, seed=9)]))
    with torch.no_grad():
        for a, b in zip(net(x, hint, t_, ctx), ref(x, hint, t_, ctx)):
            torch.testing.assert_close(a, b)
    assert (work / "loss.csv").read_text().startswith("step,loss\n1,")


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    opt = ControlTrainOptions(images=8, steps=4, batch=2, save_every=2)
    whole = ControlTrainer(tmp_path / "a", opt, progress=False, log=lambda m: None)
    whole.run(tmp_path / "a.safetensors")
    first = ControlTrainer(tmp_path / "b", ControlTrainOptions(images=8, steps=2, batch=2, save_every=2),
                           progress=False, log=lambda m: None)
    first.run(tmp_path / "b2.safetensors")
    resumed = ControlTrainer(tmp_path / "b", opt, progress=False, log=lambda m: None)
    assert resumed.step == 2
    resumed.run(tmp_path / "b.safetensors")
    assert resumed.loss_log == whole.loss_log
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_control_images_outline_the_shape_the_case_names():
    cases = control_report.cases()
    assert len(cases) == 44 and len({c.prompt for c in cases}) >= 15
    for c in cases:
        assert c.labels.shape not in c.prompt and c.labels.position not in c.prompt
        assert c.labels.color in c.prompt and c.labels.background in c.prompt
        edges = np.asarray(c.control)
        assert set(np.unique(edges)) == {0, 255} and (edges == 255).mean() < 0.1  # a white outline on black
        assert analyze(edges).position == c.labels.position
    assert {c.labels.position for c in cases} == set(shapes.POSITIONS)


def test_the_judge_reads_agreement_with_control_and_prompt():
    chosen = control_report.cases(8)
    right = [shapes.render(c.labels) for c in chosen]
    assert control_report.judge(right, chosen) == {**{k: 1.0 for k in ("shape", "position", "size", "color",
                                                                        "background", "shape+position", "all")},
                                                   "n": 8}
    moved = [shapes.render(shapes.Labels(c.labels.color, c.labels.shape, c.labels.background,
                                         "left" if c.labels.position != "left" else "right", c.labels.size))
             for c in chosen]
    got = control_report.judge(moved, chosen)
    assert got["position"] == 0 and got["shape+position"] == 0 and got["color"] == 1


def test_the_evaluation_runs_on_a_tiny_budget(pipe, trained):
    _, work, _ = trained
    got = control_report.adherence(pipe, work / "cn.safetensors", n=2, steps=2)
    plain = control_report.adherence(pipe, None, n=2, steps=2)
    for r in (got, plain):
        assert r["n"] == 2 and all(0 <= r[k] <= 1 for k in ("shape", "position", "color", "all"))
    with pytest.raises(Exception, match="1 to 44"):
        control_report.cases(45)


def test_the_cli_refuses_the_other_trainers_flags(tmp_path, capsys):
    from kiln.cli import main

    for args, words in ((["train", "demo-controlnet", "--unet-steps", "5"], "--unet-steps is not an option"),
                        (["train", "demo", "--steps", "5"], "--steps is not an option"),
                        (["train", "demo-controlnet", "--caption-dropout", "1.5"], "--caption-dropout must be"),
                        (["train", "demo-controlnet", "--base", str(tmp_path / "none.safetensors")], "--base"),
                        (["eval", "demo", "--controlnet", "x.safetensors"], "--controlnet is not an option"),
                        (["eval", "demo-controlnet", "--controlnet", str(tmp_path / "no.safetensors")],
                         "no such file")):
        assert main(args + ["--workdir", str(tmp_path / "w")] * (args[0] == "train")) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not (tmp_path / "w").exists()


def test_cubic_timesteps_lean_to_high_noise():
    from kiln.demo.train_controlnet import sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform, cubic = (sample_timesteps(k, 20000, 1000, g).float() for k in ("uniform", "cubic"))
    assert 0 <= cubic.min() and cubic.max() <= 999 and abs(uniform.mean() - 499.5) < 10
    # E[1 - u³] = 3/4, and t >= 500 when u³ <= 1/2: probability 0.5^(1/3) = 0.794
    assert abs(cubic.mean() - 750) < 10 and abs((cubic >= 500).float().mean() - 0.794) < 0.02
    with pytest.raises(Exception, match="uniform"):
        sample_timesteps("linear", 2, 1000, g)


def test_shape_dropout_captions_name_the_colors_not_the_shape(trained):
    from kiln.tokenizer import default_tokenizer

    t, _, _ = trained
    tok = default_tokenizer()
    word = lambda w: int(tok([w], max_length=8)[0][1])  # noqa: E731 (the token of a one-token word)
    data = shapes.sample(12, seed=1)
    for (_, text, labels), ids in zip(data, t.shapeless_ids(data)):
        ids = set(ids.tolist())
        assert labels.shape in text and word(labels.shape) not in ids and word("shape") in ids
        assert word(labels.color.split()[-1]) in ids
