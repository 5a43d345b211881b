"""`kiln bench --peers`: option checks, the CPU facts, the report's table and ratios, a failed player recorded rather
than raised, and (slow) the kiln and diffusers players end to end on the random full-size SD 1.5 file."""
import json
from types import SimpleNamespace

import pytest

from kiln import bench_peers as bp
from kiln.cli import main
from kiln.errors import KilnError

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
"""


def options(**kw):
    base = dict(peers="kiln,diffusers", sizes="256", precisions=None, steps=6, repeat=3, threads=2, device="auto",
                json=None, weights=None)
    return SimpleNamespace(**{**base, **kw})


def test_cpu_info_reads_model_and_flags():
    cpu = bp.cpu_info(CPUINFO)
    assert cpu["model"] == "Test CPU 9000"
    assert cpu["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": False, "amx_bf16": False}
    assert bp.native_bf16(cpu)
    assert not bp.native_bf16(bp.cpu_info(CPUINFO.replace(" avx512_bf16", "")))


def test_plan_defaults_to_bf16_only_where_native():
    cpu = bp.cpu_info(CPUINFO)
    plan = bp.check_options(options(sizes="512,256,512"), cpu)
    assert plan == dict(players=["kiln", "diffusers"], sizes=[512, 256], precisions=["fp32", "bf16"], steps=6,
                        repeat=3, threads=2)
    no_bf16 = bp.cpu_info(CPUINFO.replace(" avx512_bf16", ""))
    assert bp.check_options(options(), no_bf16)["precisions"] == ["fp32"]
    with pytest.raises(KilnError, match="no native bf16"):
        bp.check_options(options(precisions="bf16"), no_bf16)


@pytest.mark.parametrize("kw, message", [
    (dict(peers="kiln,onnx"), "onnx is not one of"),
    (dict(peers=","), "nothing is not one of"),
    (dict(precisions="fp16"), "fp16 is not one of"),
    (dict(sizes="256,300"), "multiple of 64"),
    (dict(sizes="big"), "comma-separated"),
    (dict(steps=1), "--steps must be at least 2"),
    (dict(repeat=0), "--repeat"),
    (dict(device="cuda"), "CPU implementations"),
])
def test_bad_options_are_one_line_errors(kw, message):
    with pytest.raises(KilnError, match=message) as e:
        bp.check_options(options(**kw), bp.cpu_info(CPUINFO))
    assert "\n" not in str(e.value)


def test_cli_refuses_bad_peers_before_any_work(capsys):
    assert main(["bench", "--peers", "kiln,tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "tensorrt is not one of kiln,diffusers,openvino,sdcpp" in err and len(err.strip().splitlines()) == 1


def run(e2e, load=10.0, step=1.0, peak=2e9):
    return dict(load_s=load, e2e_s=e2e, times=[e2e] * 3, one_step_s=e2e - 5 * step, step_s=step, peak_bytes=peak,
                versions={"pkg": "1.0"})


def test_report_has_a_table_per_size_and_precision_with_kiln_over_peer_ratios():
    rep = {"cpu": bp.cpu_info(CPUINFO), "weights": "w", "players": ["kiln", "diffusers", "openvino", "sdcpp"],
           "steps": 6, "repeat": 3, "threads": 2, "results": [
               {"size": 256, "precision": "fp32", "runs": {
                   "kiln": run(10.0), "diffusers": run(15.0, peak=5.5e9), "openvino": run(8.0),
                   "sdcpp": {"error": "exit 1: no such wtype"}}},
               {"size": 256, "precision": "bf16", "runs": {"kiln": run(6.0, step=0.75), "diffusers": run(12.0)}}]}
    text = bp.format_peers(rep)
    lines = text.splitlines()
    assert "CPU: Test CPU 9000 (avx2+ avx512f+ avx512_bf16+ amx_tile- amx_bf16-)" in text
    assert "Euler, CFG 7.5, 6 steps" in lines[0] and "2 threads" in lines[0] and "median of 3" in lines[0]
    assert "  openvino: pkg 1.0" in lines
    i = lines.index("256x256 fp32")
    assert lines[i + 1].split() == ["player", "load", "s", "e2e", "s", "s/step", "peak", "RSS", "GB", "kiln/peer"]
    assert lines[i + 2].split() == ["kiln", "10.0", "10.00", "1.000", "2.00"]
    assert lines[i + 3].split() == ["diffusers", "10.0", "15.00", "1.000", "5.50", "1.50x"]  # > 1: kiln faster
    assert lines[i + 4].split()[-1] == "0.80x"
    assert lines[i + 5].split() == ["sdcpp", "failed:", "exit", "1:", "no", "such", "wtype"]
    j = lines.index("256x256 bf16")
    assert lines[j + 2].split()[3] == "0.750" and lines[j + 3].split()[-1] == "2.00x"


def test_a_failing_player_is_recorded_not_raised(tmp_path):
    """The worker runs for real and fails on a missing weights file: the bench goes on with a one-line error."""
    plan = dict(steps=2, repeat=1, threads=1)
    r = bp.run_peer("kiln", tmp_path / "missing.safetensors", 64, "fp32", plan, tmp_path / "x.npy")
    assert set(r) == {"error", "stderr"} and r["error"].startswith("exit 1: ") and "\n" not in r["error"]


def test_peer_venvs_pin_their_packages():
    for player, packages in bp.VENV_PACKAGES.items():
        pinned = [p for p in packages if p != "numpy"]
        assert pinned and all("==" in p for p in pinned), player
    assert bp.player_python("kiln") == bp.player_python("diffusers")  # the current interpreter, no venv


@pytest.mark.slow
def test_kiln_and_diffusers_players_end_to_end(sd15, tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert main(["bench", "--peers", "kiln,diffusers", "--weights", str(sd15["fp32"]), "--sizes", "64",
                 "--precisions", "fp32", "--steps", "2", "--repeat", "1", "--threads", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    (res,) = rep["results"]
    assert (res["size"], res["precision"]) == (64, "fp32") and set(res["runs"]) == {"kiln", "diffusers"}
    for run in res["runs"].values():
        assert "error" not in run, run.get("stderr")
        assert run["e2e_s"] > 0 and run["load_s"] > 0 and run["peak_bytes"] > 1e9 and len(run["times"]) == 1
    assert "torch" in res["runs"]["kiln"]["versions"] and "diffusers" in res["runs"]["diffusers"]["versions"]
    assert "kiln/peer" in capsys.readouterr().out
