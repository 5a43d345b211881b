"""`kiln txt2img` behaviour on a tiny random model of the SD architecture: outputs, seeds, flags, bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import kiln
import sdref
from kiln.cli import main
from kiln.pipeline import generators, randn


def txt2img(ckpt, outdir, *args):
    return main(["txt2img", "--ckpt", str(ckpt), "--outdir", str(outdir), "--ddim_steps", "4", "--precision", "full",
                 "--prompt", "a red circle on a blue background", *args])


def png(path):
    return np.asarray(Image.open(path))


def test_outputs_are_numbered_and_grid_laid_out_as_compvis(tiny, tmp_path):
    assert txt2img(tiny, tmp_path, "--n_samples", "2", "--n_iter", "2") == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"{i:05}.png" for i in range(4)]
    grid = png(tmp_path / "grid-0000.png")
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 rows of n_samples, make_grid padding 2
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
    assert np.array_equal(grid[2:66, 68:132], png(tmp_path / "samples" / "00001.png"))
    # A second run numbers on from what is there.
    assert txt2img(tiny, tmp_path, "--n_samples", "1", "--n_iter", "1", "--n_rows", "1") == 0
    assert (tmp_path / "samples" / "00004.png").exists() and (tmp_path / "grid-0001.png").exists()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_skip_save_and_skip_grid(tiny, tmp_path):
    assert txt2img(tiny, tmp_path / "a", "--n_samples", "1", "--n_iter", "1", "--skip_save") == 0
    assert not list((tmp_path / "a" / "samples").iterdir()) and (tmp_path / "a" / "grid-0000.png").exists()
    assert txt2img(tiny, tmp_path / "b", "--n_samples", "1", "--n_iter", "1", "--skip_grid") == 0
    assert (tmp_path / "b" / "samples" / "00000.png").exists() and not (tmp_path / "b" / "grid-0000.png").exists()


def test_latents_that_do_not_halve_evenly_work():
    # The UNet upsamples to each skip's size (as diffusers does), so SD's 512+8k sizes work: latent 10x6 → 5x3 → 3x2.
    from kiln.models import UNetConfig, UNetModel

    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2,), num_res_blocks=1,
                                num_heads=2, context_dim=16))
    out = unet(torch.randn(1, 4, 10, 6), torch.tensor([10]), torch.randn(1, 5, 16))
    assert out.shape == (1, 4, 10, 6)


def test_native_size_is_the_default(tiny, tmp_path):
    assert txt2img(tiny, tmp_path, "--n_samples", "1", "--n_iter", "1") == 0
    assert png(tmp_path / "samples" / "00000.png").shape == (64, 64, 3)


def test_image_i_uses_seed_plus_i_whatever_the_batch(tiny):
    pipe = kiln.load(tiny, device="cpu")
    batch = pipe.txt2img("a star", steps=4, seed=42, batch_size=3)
    single = pipe.txt2img("a star", steps=4, seed=44, batch_size=1)
    assert batch.seeds == [42, 43, 44] and single.seeds == [44]
    start = randn((4, 16, 16), generators([44]), "cpu")
    # the third image of the batch and the single image start from the same noise…
    assert torch.equal(start[0], randn((4, 16, 16), generators([42, 43, 44]), "cpu")[2])
    # …and end in the same pixels (batched matmuls may differ in the last float bits, so allow ±1 on 0.1%).
    diff = np.abs(batch.pixels[2].astype(int) - single.pixels[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    assert not np.array_equal(batch.pixels[0], batch.pixels[1])


def test_seeds_count_across_iterations_and_fixed_code(tiny):
    pipe = kiln.load(tiny, device="cpu")
    free = pipe.txt2img("a star", steps=4, seed=7, batch_size=1, n_iter=2)
    fixed = pipe.txt2img("a star", steps=4, seed=7, batch_size=1, n_iter=2, fixed_code=True)
    assert free.seeds == [7, 8]
    assert not np.array_equal(free.pixels[0], free.pixels[1])
    assert np.array_equal(fixed.pixels[0], fixed.pixels[1])  # the first iteration's start code is reused
    assert np.array_equal(fixed.pixels[0], free.pixels[0])


def test_from_file_chunks_prompts_into_batches(tiny, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\na blue square\na green star\n")
    pipe = kiln.load(tiny, device="cpu")
    res = pipe.txt2img(["a red circle", "a blue square", "a green star"], steps=2, seed=1, batch_size=2, n_iter=2)
    assert res.prompts == ["a red circle", "a blue square", "a green star"] * 2 and res.seeds == list(range(1, 7))
    assert txt2img(tiny, tmp_path / "out", "--from-file", str(f), "--n_samples", "2", "--n_iter", "1",
                   "--ddim_steps", "2", "--seed", "1") == 0
    saved = sorted((tmp_path / "out" / "samples").iterdir())
    assert len(saved) == 3
    assert np.array_equal(png(saved[2]), res.pixels[2])


def test_cfg_scale_and_negative_prompt_change_the_image(tiny):
    pipe = kiln.load(tiny, device="cpu")
    base = pipe.txt2img("a red circle", steps=4, seed=3, cfg_scale=7.5).pixels
    assert not np.array_equal(base, pipe.txt2img("a red circle", steps=4, seed=3, cfg_scale=1.0).pixels)
    assert not np.array_equal(base, pipe.txt2img("a red circle", steps=4, seed=3, negative_prompt="blue").pixels)
    assert not np.array_equal(base, pipe.txt2img("a green circle", steps=4, seed=3).pixels)


def test_plms_and_eta_run_and_differ(tiny):
    pipe = kiln.load(tiny, device="cpu")
    ddim = pipe.txt2img("x", steps=4, seed=3).pixels
    assert not np.array_equal(ddim, pipe.txt2img("x", steps=4, seed=3, sampler="plms").pixels)
    a = pipe.txt2img("x", steps=4, seed=3, eta=1.0).pixels
    assert np.array_equal(a, pipe.txt2img("x", steps=4, seed=3, eta=1.0).pixels)  # eta noise is seeded too
    assert not np.array_equal(a, ddim)


def test_autocast_precision_on_cpu(tiny):
    from kiln.pipeline import cpu_has_bf16

    full = kiln.load(tiny, device="cpu", precision="full")
    auto = kiln.load(tiny, device="cpu", precision="autocast")
    a = full.txt2img("x", steps=4, seed=3).pixels.astype(float)
    b = auto.txt2img("x", steps=4, seed=3).pixels.astype(float)
    if cpu_has_bf16():
        assert auto.dtype == torch.bfloat16 and auto.model.unet.dtype == torch.bfloat16
        assert np.abs(a - b).mean() < 12  # bf16 keeps ~3 significant digits
    else:  # emulated bf16 would be slower than fp32: autocast stays fp32 on such CPUs
        assert auto.dtype == torch.float32 and np.array_equal(a, b)


def test_bf16_weights_run_on_cpu(tiny):
    from kiln.checkpoints import load_model

    model, _ = load_model(tiny, dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16
    out = model.unet(torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([5]),
                     torch.randn(1, 77, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_watermark_decodes_from_a_saved_sample(tiny, tmp_path):
    from kiln.pipeline.watermark import decode_watermark

    assert txt2img(tiny, tmp_path, "--n_samples", "1", "--n_iter", "1", "--H", "256", "--W", "256",
                   "--ddim_steps", "2", "--skip_grid") == 0
    img = png(tmp_path / "samples" / "00000.png")
    assert decode_watermark(img, len("StableDiffusionV1")) == "StableDiffusionV1"
    assert txt2img(tiny, tmp_path / "plain", "--n_samples", "1", "--n_iter", "1", "--H", "256", "--W", "256",
                   "--ddim_steps", "2", "--skip_grid", "--no-watermark") == 0
    assert decode_watermark(png(tmp_path / "plain" / "samples" / "00000.png"), 17) != "StableDiffusionV1"


def test_small_images_say_the_watermark_is_skipped(tiny, tmp_path, capsys):
    assert txt2img(tiny, tmp_path, "--n_samples", "1", "--n_iter", "1") == 0
    assert "cannot carry the invisible watermark" in capsys.readouterr().err


def test_separate_vae_file_with_and_without_prefix(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    other = sdref.random_state(sdref.tiny_config(), seed=9, prefix_filter="first_stage_model.")
    with_prefix, bare = tmp_path / "vae.safetensors", tmp_path / "vae-bare.safetensors"
    save_file(other, with_prefix)
    save_file({k.removeprefix("first_stage_model."): v for k, v in other.items()}, bare)
    for f in (with_prefix, bare):
        pipe = kiln.load(tiny, device="cpu", vae=str(f))
        got = pipe.model.vae.state_dict()
        assert all(torch.equal(got[k.removeprefix("first_stage_model.")], v) for k, v in other.items())
        assert pipe.info.vae_path == str(f)
    unet_before = load_file(tiny)["model.diffusion_model.out.2.weight"]
    assert torch.equal(kiln.load(tiny, device="cpu", vae=str(bare)).model.unet.out[2].weight, unet_before)


def test_diffusers_style_position_ids_and_extra_keys_are_tolerated(tmp_path):
    from safetensors.torch import save_file

    state = sdref.random_state(sdref.tiny_config(), seed=2)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None].float() + 0.3
    state.update(sdref.schedule_buffers(sdref.tiny_config()))
    import json

    save_file(state, tmp_path / "m.safetensors", metadata={"kiln_config": json.dumps(sdref.tiny_config().to_dict())})
    pipe = kiln.load(tmp_path / "m.safetensors", device="cpu")
    assert pipe.txt2img("x", steps=2).pixels.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------ bad input: one line, non-zero exit, no files

def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("kiln: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize("args,words", [
    (["--H", "100"], "multiple of 8"),
    (["--W", "0"], "multiple of 8"),
    (["--n_samples", "0"], "at least 1"),
    (["--n_iter", "0"], "at least 1"),
    (["--from-file", "/nonexistent/prompts.txt"], "cannot read"),
    (["--ema", "on"], "no EMA weights"),
    (["--plms", "--ddim_eta", "0.5"], "deterministic and has no eta"),
    (["--C", "8"], "--C 8"),
    (["--f", "16"], "--f 16"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_bad_arguments_give_one_line(tiny, tmp_path, capsys, args, words):
    assert txt2img(tiny, tmp_path, "--n_iter", "1", "--n_samples", "1", *args) != 0
    assert words in one_error_line(capsys)
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").iterdir())


def test_unwritable_outdir(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert txt2img(tiny, blocker / "out") != 0
    assert "cannot create the output folder" in one_error_line(capsys)


def test_config_that_does_not_fit_the_weights(tiny, tmp_path, capsys):
    assert txt2img(tiny, tmp_path, "--config", str(sdref.DATA / "v1-inference.yaml")) != 0
    assert "does not match" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated-safetensors", "truncated-ckpt", "random",
                                  "no-unet"])
def test_bad_checkpoint_files(tiny, tmp_path, capsys, kind):
    f = tmp_path / "model.safetensors"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "text":
        f = tmp_path / "model.ckpt"
        f.write_text("this is not a checkpoint\n" * 10)
    elif kind == "truncated-safetensors":
        f.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    elif kind == "truncated-ckpt":
        f = tmp_path / "model.ckpt"
        full = tmp_path / "full.ckpt"
        torch.save({"state_dict": {"a": torch.zeros(1000)}}, full)
        f.write_bytes(full.read_bytes()[:-300])
    elif kind == "random":
        f = tmp_path / "model.ckpt"
        f.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "no-unet":
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.zeros(3)}, f)
    assert txt2img(f, tmp_path / "out") != 0
    line = one_error_line(capsys)
    assert str(f.name) in line or "model" in line
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())


def test_cli_process_never_prints_a_traceback(tmp_path):
    f = tmp_path / "bad.ckpt"
    f.write_bytes(b"\x80\x02garbage")
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "txt2img", "--ckpt", str(f), "--outdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("kiln: error:") and len(r.stderr.strip().splitlines()) == 1


def test_missing_default_ckpt_is_explained(tmp_path, capsys, monkeypatch):
    import kiln.demo.report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kiln.demo.report, "EMBEDDED", tmp_path / "absent.safetensors")
    assert main(["txt2img", "--outdir", str(tmp_path / "o")]) != 0
    assert "--ckpt" in one_error_line(capsys)


def test_inpainting_checkpoint_is_refused_by_txt2img(tmp_path, capsys):
    import json
    from dataclasses import replace

    from safetensors.torch import save_file

    cfg = sdref.tiny_config()
    cfg = replace(cfg, family="sd1-inpaint", unet=replace(cfg.unet, in_channels=9))
    save_file(sdref.random_state(cfg), tmp_path / "inpaint.safetensors",
              metadata={"kiln_config": json.dumps(cfg.to_dict())})
    assert txt2img(tmp_path / "inpaint.safetensors", tmp_path / "out") != 0
    assert "inpainting model" in one_error_line(capsys)


def test_memory_flags(tiny, tmp_path, capsys):
    """--no-prepack is PyTorch's plain convolution (same picture up to float order); --lowvram on a CPU has nothing to
    offload and says so; --medvram and --lowvram together are refused by the parser."""
    assert txt2img(tiny, tmp_path / "a", "--n_samples", "1") == 0
    assert txt2img(tiny, tmp_path / "b", "--n_samples", "1", "--no-prepack", "--lowvram") == 0
    assert "--lowvram: the model runs on the CPU, so there is nothing to offload" in capsys.readouterr().err
    a, b = (png(tmp_path / d / "samples" / "00000.png").astype(int) for d in "ab")
    assert np.abs(a - b).max() <= 1
    with pytest.raises(SystemExit):
        txt2img(tiny, tmp_path / "c", "--medvram", "--lowvram")
    assert "not allowed with argument" in capsys.readouterr().err


def test_serve_passes_memory_flags_to_the_loader(tiny, monkeypatch):
    import kiln
    from kiln.server import worker as worker_module
    from kiln.server.app import ServerConfig, make_worker

    seen = []
    real = worker_module.Worker.__init__

    def spy(self, *a, **kw):
        kw["loader"] = lambda path, **options: seen.append(options) or kiln.load(path, **options)
        real(self, *a, **kw)

    monkeypatch.setattr(worker_module.Worker, "__init__", spy)
    w = make_worker(ServerConfig(ckpt=str(tiny), device="cpu", offload="lowvram", prepack=False, outdir=None))
    w.stop()
    assert seen == [{"device": "cpu", "precision": "auto", "offload": "lowvram", "prepack": False}]
    assert any("nothing to offload" in n for n in w.pipe.notices)
