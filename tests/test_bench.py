"""`kiln bench` end to end on the random full-size SD 1.5 file: both sides run, the report has every figure,
and the two images agree (max |Δ| ≤ 1e-3 before quantisation) — the optimisations change no output."""
import json

import pytest

from kiln.cli import main

pytestmark = pytest.mark.slow


def test_bench_reports_ratios_and_identical_images(sd15, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--weights", str(sd15["fp32"]), "--size", "64", "--steps", "2", "--repeat", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["runs"]) == {"diffusers", "kiln"}
    for run in rep["runs"].values():
        assert all(run[k] > 0 for k in ("load_s", "unet_step_s", "vae_decode_s", "txt2img_s", "peak_bytes"))
    r = rep["ratios"]["kiln"]
    assert set(r) == {"unet_step_speedup", "txt2img_speedup", "vae_decode_speedup", "load_speedup", "peak_memory_ratio"}
    assert rep["max_abs_diff"]["kiln"] <= 1e-3
    text = capsys.readouterr().out
    assert "kiln vs diffusers: UNet step" in text and "peak memory" in text


def test_bench_refuses_bad_input(tmp_path, capsys):
    assert main(["bench", "--weights", str(tmp_path / "none.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", "--size", "100", "--weights", str(tmp_path / "none.safetensors")]) == 1
