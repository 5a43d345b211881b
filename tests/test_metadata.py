"""Infotext (A1111's PNG "parameters"), model hashes, reproduce-from-PNG, `kiln info`, concurrent writers."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from kiln.checkpoints.hashes import autov2, full_sha256, legacy_hash
from kiln.cli import main
from kiln.pipeline.infotext import format_infotext, generation_fields, parse_infotext, quote
from kiln.pipeline.infotext import params_from_infotext as txt2img_kwargs

PROMPT = "a small red star on the left on a blue background"

PARAMS = dict(steps=20, sampler="dpmpp_2m", schedule="karras", cfg_scale=7.0, width=512, height=512,
              negative_prompt="blurry, ugly", eta=0.0, s_noise=1.0, clip_skip=1, precision="full", ema=True)


def test_infotext_is_a1111s_format():
    text = format_infotext("a cat", "blurry, ugly",
                           generation_fields(PARAMS, 123, "v1-5-pruned-emaonly", "6ce0161689"))
    lines = text.split("\n")
    assert lines[0] == "a cat"
    assert lines[1] == "Negative prompt: blurry, ugly"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, "
                               "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, ")
    assert "Precision: full" in lines[2] and "EMA: on" in lines[2] and "Version: kiln " in lines[2]
    assert "Eta" not in lines[2] and "Clip skip" not in lines[2]  # defaults are not written, as A1111


def test_quoting_and_parsing_round_trip():
    assert quote("plain") == "plain" and quote("a, b") == '"a, b"' and quote('say "x": y') == '"say \\"x\\": y"'
    fields = generation_fields(dict(PARAMS, sampler="euler_a", schedule="normal", eta=0.5, clip_skip=2), 7,
                               "my, model", None)
    text = format_infotext("line one\nline two", "", fields)
    back = parse_infotext(text)
    assert back["prompt"] == "line one\nline two" and back["negative_prompt"] == ""
    assert back["Model"] == "my, model" and back["Eta"] == "0.5" and back["Clip skip"] == "2"
    kw = txt2img_kwargs(back)
    assert kw == dict(prompt="line one\nline two", negative_prompt="", steps=20, sampler="euler_a",
                      schedule="normal", cfg_scale=7.0, seed=7, width=512, height=512, clip_skip=2, eta=0.5)


def test_ddim_and_plms_write_a_schedule_type_only_for_quad():
    plain = format_infotext("a", "", generation_fields(dict(PARAMS, sampler="ddim", schedule=None), 1, None, None))
    assert "Schedule type" not in plain and txt2img_kwargs(parse_infotext(plain))["schedule"] == "normal"
    quad = format_infotext("a", "", generation_fields(dict(PARAMS, sampler="plms", schedule="quad"), 1, None, None))
    assert "Sampler: PLMS, Schedule type: Quad," in quad
    kw = txt2img_kwargs(parse_infotext(quad))
    assert (kw["sampler"], kw["schedule"]) == ("plms", "quad")


def test_ddim_and_plms_record_uniform_where_the_model_defaults_to_quad():
    from kiln.pipeline import recorded_schedule
    from kiln.samplers import SAMPLERS

    plms, ddim, euler = SAMPLERS["plms"], SAMPLERS["ddim"], SAMPLERS["euler"]
    assert recorded_schedule(plms, "normal") is None  # real checkpoints: CompVis'/A1111's infotext
    assert recorded_schedule(plms, "quad") == "quad"
    assert recorded_schedule(plms, "normal", model_default="quad") == "normal"  # the demo model
    assert recorded_schedule(ddim, "normal", model_default=None) is None
    assert recorded_schedule(euler, "normal") == "normal"
    text = format_infotext("a", "", generation_fields(dict(PARAMS, sampler="plms", schedule="normal"), 1, None, None))
    assert "Sampler: PLMS, Schedule type: Uniform," in text
    assert txt2img_kwargs(parse_infotext(text))["schedule"] == "normal"


def test_parses_an_a1111_written_infotext():
    text = ("masterpiece, (best quality:1.2), a castle\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3917371052, Size: 512x768, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, Clip skip: 2, "
            'Hires upscale: 2, Lora hashes: "detail: 2a8e0d3c1bd3", Version: v1.6.0')
    info = parse_infotext(text)
    assert info["prompt"] == "masterpiece, (best quality:1.2), a castle"
    assert info["negative_prompt"] == "lowres, bad anatomy"
    assert info["Lora hashes"] == "detail: 2a8e0d3c1bd3"
    kw = txt2img_kwargs(info)
    assert (kw["sampler"], kw["schedule"], kw["steps"], kw["cfg_scale"], kw["seed"]) == \
        ("dpmpp_2m", "karras", 28, 6.5, 3917371052)
    assert (kw["width"], kw["height"], kw["clip_skip"]) == (512, 768, 2)


# ------------------------------------------------------------------------------------------------ hashes
def test_hashes_match_hashlib_and_cache_invalidates(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "model.safetensors"
    data = np.random.default_rng(0).bytes(3 * (1 << 20))
    f.write_bytes(data)
    assert full_sha256(f) == hashlib.sha256(data).hexdigest()
    assert autov2(f) == hashlib.sha256(data).hexdigest()[:10]
    assert legacy_hash(f) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    cache = tmp_path / "model.safetensors.kiln-hash.json"
    assert json.loads(cache.read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    # a cached value is used while size and mtime match ...
    entry = json.loads(cache.read_text())
    cache.write_text(json.dumps(dict(entry, sha256="0" * 64)))
    assert autov2(f) == "0" * 10
    # ... and dropped when the file changes
    data2 = data[:-1] + b"\x00"
    f.write_bytes(data2)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert autov2(f) == hashlib.sha256(data2).hexdigest()[:10]


def test_hash_cache_falls_back_to_user_cache_when_it_cannot_write_beside(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "m.ckpt"
    f.write_bytes(b"kiln" * 1000)
    (tmp_path / "m.ckpt.kiln-hash.json").mkdir()  # unwritable as a file, even for root
    assert autov2(f) == hashlib.sha256(b"kiln" * 1000).hexdigest()[:10]
    user = json.loads((tmp_path / "cache" / "kiln" / "hashes.json").read_text())
    assert user[str(f.resolve())]["sha256"] == hashlib.sha256(b"kiln" * 1000).hexdigest()
    user[str(f.resolve())]["sha256"] = "f" * 64  # and it is read back from there
    (tmp_path / "cache" / "kiln" / "hashes.json").write_text(json.dumps(user))
    assert autov2(f) == "f" * 10


# ------------------------------------------------------------------------------------------ with the model
def generate(tmp_path, *extra, name="out"):
    out = tmp_path / name
    rc = main(["txt2img", "--prompt", PROMPT, "--negative-prompt", "a green square", "--ddim_steps", "8",
               "--n_samples", "2", "--n_iter", "1", "--skip_grid", "--outdir", str(out), "--seed", "5", *extra])
    assert rc == 0
    return sorted((out / "samples").glob("*.png"))


@pytest.mark.parametrize("sampler", ["ddim", "Euler a", "DPM++ 2M Karras", "dpmpp_sde", "unipc"])
def test_regenerate_from_png_is_pixel_identical(tmp_path, sampler):
    first, second = generate(tmp_path, "--sampler", sampler, "--scale", "4.5")
    text = Image.open(second).info["parameters"]
    assert text.startswith(PROMPT + "\nNegative prompt: a green square\n") and "Seed: 6," in text
    again = tmp_path / "again"
    assert main(["txt2img", "--from-png", str(second), "--outdir", str(again)]) == 0
    (made,) = (again / "samples").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(second)))
    assert Image.open(made).info["parameters"] == text


def test_third_party_readers_understand_our_pngs(tmp_path):
    from sd_parsers import ParserManager
    from sd_prompt_reader.image_data_reader import ImageDataReader

    (png, _) = generate(tmp_path, "--sampler", "DPM++ 2M Karras", "--scale", "6")
    r = ImageDataReader(str(png))
    assert r.tool == "A1111 webUI" and r.positive == PROMPT and r.negative == "a green square"
    assert r.parameter["steps"] == "8" and r.parameter["seed"] == "5" and r.parameter["cfg"] == "6"
    assert r.parameter["sampler"] == "DPM++ 2M" and r.parameter["size"] == "64x64"
    data = ParserManager().parse(str(png))
    assert data is not None and data.generator.name == "AUTOMATIC1111"
    (s,) = data.samplers
    assert s.name == "DPM++ 2M" and s.parameters["scheduler"] == "Karras"
    assert (s.parameters["steps"], s.parameters["cfg_scale"], s.parameters["seed"]) == ("8", "6", "5")
    assert [p.value for p in s.prompts] == [PROMPT] and [p.value for p in s.negative_prompts] == ["a green square"]
    assert s.model.name == "demo" and len(s.model.hash) == 10
    assert data.metadata["Size"] == "64x64"


def test_kiln_info_and_metadata_formats(tmp_path, capsys):
    (a, _) = generate(tmp_path, "--metadata-format", "json", name="j")
    assert "parameters" not in Image.open(a).info and "kiln-parameters" in Image.open(a).info
    capsys.readouterr()
    assert main(["info", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompt"] == PROMPT and info["Seed"] == "5" and info["Sampler"] == "DDIM"
    (b, _) = generate(tmp_path, "--metadata-format", "none", name="n")
    assert not {"parameters", "kiln-parameters"} & set(Image.open(b).info)
    assert main(["info", str(b)]) == 1
    assert "carries no generation parameters" in capsys.readouterr().err
    (c, _) = generate(tmp_path, name="a")
    assert main(["info", str(c)]) == 0
    assert capsys.readouterr().out.startswith(PROMPT + "\nNegative prompt: a green square\nSteps: 8, Sampler: DDIM")
    assert main(["info", str(tmp_path / "missing.png")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_watermark_text_and_decoding(tmp_path, capsys):
    from kiln.pipeline.watermark import put_watermark

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)
    path = tmp_path / "w.png"
    Image.fromarray(put_watermark(pixels, "kiln-test-mark")).save(path)
    assert main(["info", "--watermark", "--watermark-text", "kiln-test-mark", str(path)]) == 0
    assert "(matches)" in capsys.readouterr().out
    assert main(["txt2img", "--watermark", " ", "--outdir", str(tmp_path / "x"), "--n_iter", "1"]) == 1
    assert "--watermark must not be empty" in capsys.readouterr().err


def test_two_processes_writing_one_outdir_lose_nothing(tmp_path):
    script = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from kiln.output import OutputDir\n"
        "out = OutputDir(sys.argv[1])\n"
        "for i in range(40):\n"
        "    px = np.full((8, 8, 3), 0, np.uint8); px[0, 0] = [int(sys.argv[2]), i, 7]\n"
        "    out.save_sample(Image.fromarray(px))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "o"), str(k)]) for k in (1, 2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = sorted((tmp_path / "o" / "samples").iterdir())
    assert [f.name for f in files] == [f"{i:05}.png" for i in range(80)]
    marks = {tuple(np.asarray(Image.open(f))[0, 0]) for f in files}
    assert marks == {(k, i, 7) for k in (1, 2) for i in range(40)}
    assert not list((tmp_path / "o" / "samples").glob(".tmp-*"))
