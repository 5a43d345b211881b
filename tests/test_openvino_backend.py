"""`--backend openvino` (kiln.pipeline.openvino_backend): kiln's models through OpenVINO's torch.compile backend
give the eager path's latents and pixels within float noise, see LoRA changes, and refuse what they cannot do with
one line.

Measured on the demo model (64 px, Euler 3 steps, CFG, batch 2, fp32, openvino 2026.4.1, torch 2.13): latents max
|Δ| 8.4e-5 (they reach ±3.1, so 2.7e-5 relative), the VAE decoder alone on the same latents 1.5e-6 in 0–1 pixels,
final uint8 pixels at most 1 level apart. The bounds below leave 10x or more room for other CPUs."""
import sys

import pytest
import torch

import kiln
from kiln.cli import main
from kiln.demo.report import EMBEDDED
from kiln.errors import KilnError

pytest.importorskip("openvino")

LATENTS_TOL = 1e-3  # relative to the latents' largest magnitude
PIXELS_TOL = 2e-4  # 0–1 pixels


def run(pipe, loras=None, steps=3):
    return pipe.txt2img("a red circle", steps=steps, sampler="euler", width=64, height=64, seed=5, batch_size=2,
                        loras=loras)


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(tmp_path_factory.mktemp("kiln-cache")))
        yield kiln.load(EMBEDDED, device="cpu", backend="openvino")


def test_latents_and_pixels_match_eager(pipe, ov):
    a, b = run(pipe), run(ov)
    scale = a.latents.abs().max()
    d = (a.latents - b.latents).abs().max()
    assert 0 < d <= LATENTS_TOL * scale, (d, scale)  # > 0: OpenVINO really computed it (not an eager fallback)
    assert abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1  # uint8
    with torch.no_grad():  # the VAE decoder alone, on the same latents, in 0–1 pixels
        da, db = ((p.decode_latents(a.latents) + 1) / 2 for p in (pipe, ov))
    assert (da - db).abs().max() <= PIXELS_TOL, (da - db).abs().max()
    from openvino.frontend.pytorch.torchdynamo.execute import compiled_cache

    assert compiled_cache, "nothing ran in OpenVINO"
    hints = {str(c.get_property("INFERENCE_PRECISION_HINT")) for c in compiled_cache.values()}
    assert hints == {"<Type: 'float32'>"}, hints  # fp32 asked: never bf16 behind our back


def test_outputs_are_not_overwritten_by_the_next_call(ov):
    # OpenVINO answers in its own output buffer, which its next call overwrites (samplers keep earlier outputs)
    ids = torch.randint(0, 1000, (2, 1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = ov.model.text_model(ids[0])
        kept = first.clone()
        second = ov.model.text_model(ids[1])
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_vae_encoder_matches_eager(pipe, ov):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        a, b = pipe.model.vae.encoder(x), ov.model.vae.encoder(x)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_lora_changes_reach_the_compiled_models(pipe, ov, cross_attention_lora):
    lora = cross_attention_lora(ov.model)
    plain = run(ov).latents
    a, b = run(pipe, lora).latents, run(ov, lora).latents
    assert (a - plain).abs().max() > 1e-2 * a.abs().max()  # the LoRA changes the result
    assert (a - b).abs().max() <= LATENTS_TOL * a.abs().max()
    # and taking it off again (the original weights restored) reaches them too
    assert (run(ov).latents - plain).abs().max() <= LATENTS_TOL * plain.abs().max()


def test_deepcache_on_top_matches_eager(pipe, ov):
    try:
        for p in (pipe, ov):
            p.set_deepcache(2)
        a, b = run(pipe, steps=4).latents, run(ov, steps=4).latents
    finally:
        for p in (pipe, ov):
            p.set_deepcache(None)
    assert (a - b).abs().max() <= LATENTS_TOL * a.abs().max()


@pytest.mark.parametrize("kw, message", [
    ({"device": "cuda"}, "runs kiln's models on the CPU"),
    ({"offload": "lowvram"}, "--lowvram do not go together"),
    ({"backend": "tensorrt"}, "backend must be one of torch, openvino"),
])
def test_bad_combinations_are_refused(kw, message):
    with pytest.raises(KilnError, match=message):
        kiln.load(EMBEDDED, **{"backend": "openvino", **kw})


def test_missing_openvino_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino.torch", None)  # import fails as if not installed
    with pytest.raises(KilnError, match=r"pip install 'kiln\[openvino\]'"):
        kiln.load(EMBEDDED, backend="openvino")


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "does not go with --device cuda"),
    (["--medvram"], "--medvram do not go together"),
    (["--compile"], "--compile and --backend openvino"),
])
def test_cli_refuses_with_one_line(flags, message, capsys, tmp_path):
    rc = main(["txt2img", "--prompt", "x", "--ckpt", str(EMBEDDED), "--outdir", str(tmp_path), "--backend",
               "openvino", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err and len(err.splitlines()) == 1, err


def test_bench_checks_openvino_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "openvino.torch", None)
    assert main(["bench", "--openvino", "--device", "cpu", "--weights", str(tmp_path / "w.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "needs OpenVINO" in err and len(err.splitlines()) == 1, err
