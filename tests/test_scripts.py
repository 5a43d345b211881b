"""A1111's scripts (`kiln.scripts`) on the demo model: X/Y/Z plot cells equal plain generations pixel for pixel,
grids are labelled and laid out as A1111's, SD upscale doubles a picture, prompt matrix and prompts-from-file
make what their arguments say, and bad arguments are one-line errors."""
import numpy as np
import pytest
from PIL import Image

from kiln import scripts
from kiln.errors import KilnError
from kiln.pipeline import GenerationParams
from kiln.scripts import Env, Runner
from kiln.scripts.grid import combine_tiles, split_tiles
from kiln.scripts.xyz import axes_for, axis_values, find_axis

PROMPT = "a red circle on a blue background"


def base(**kw):
    return GenerationParams(**{**dict(prompt=PROMPT, steps=2, sampler="euler", width=64, height=64, seed=5), **kw})


def env(mode="txt2img", **kw):
    return Env(mode, native_size=64, size_unit=8, clip_layers=1, **kw)


def xyz_args(x=(4, "2,3"), y=(0, ""), z=(0, ""), **flags):
    order = ["draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x",
             "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode"]
    defaults = dict(draw_legend=True, include_lone_images=True, include_sub_grids=False, no_fixed_seeds=False,
                    vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    defaults.update(flags)
    return [x[0], x[1], None, y[0], y[1], None, z[0], z[1], None] + [defaults[k] for k in order]


def run(pipe, name, args, p, mode="txt2img", **env_kw):
    return scripts.run(scripts.prepare(name, args, p, env(mode, **env_kw)), Runner(pipe))


def px(im):
    return np.asarray(im.convert("RGB"))


def test_xyz_cells_equal_plain_generations_and_the_grid_is_labelled(pipe):
    out = run(pipe, "x/y/z plot", xyz_args(x=(4, "2,3"), y=(6, "5, 7.5")), base())
    assert out.grids == 1 and len(out.results) == 5
    grid, cells = out.images[0], out.images[1:]
    for cell, (steps, cfg) in zip(cells, [(2, 5), (3, 5), (2, 7.5), (3, 7.5)]):  # x fastest, as A1111
        want = pipe.txt2img(PROMPT, steps=steps, cfg_scale=cfg, sampler="euler", width=64, height=64, seed=5)
        assert np.array_equal(px(cell), want.pixels[0])
        assert f"Steps: {steps}," in out.results[cells.index(cell) + 1].infotexts[0]
    assert not np.array_equal(px(cells[0]), px(cells[1]))
    # labels above (X) and at the left (Y) of a 2x2 block of 64 px cells placed without padding
    pad_left, pad_top = grid.width - 128, grid.height - 128
    assert pad_left == 48 and pad_top > 0
    g = px(grid)
    assert np.array_equal(g[pad_top:pad_top + 64, pad_left + 64:], px(cells[1]))
    assert np.array_equal(g[pad_top + 64:, pad_left:pad_left + 64], px(cells[2]))
    assert (g[:pad_top, pad_left:] < 100).any() and (g[pad_top:, :pad_left] < 100).any()  # text was drawn
    text = out.infotexts[0]
    assert "Script: X/Y/Z plot" in text and 'X Type: Steps, X Values: "2,3"' in text and "Y Type: CFG Scale" in text


def test_xyz_without_legend_lone_images_and_with_z_sub_grids(pipe):
    out = run(pipe, "x/y/z plot", xyz_args(x=(1, "7,8"), z=("Prompt S/R", "red,green"), draw_legend=False,
                                           include_lone_images=False, include_sub_grids=True), base())
    assert out.grids == 3 and len(out.results) == 3  # the Z grid, one sub-grid per Z value, no lone images
    assert out.images[0].size == (256, 64) and out.images[1].size == (128, 64)
    assert np.array_equal(px(out.images[0])[:, :128], px(out.images[1]))
    assert 'Fixed X Values: "7, 8"' in out.infotexts[0] and "Z Type: Prompt S/R" in out.infotexts[0]
    assert "Z Type" not in out.infotexts[1]
    green = pipe.txt2img("a green circle on a blue background", steps=2, sampler="euler", width=64, height=64,
                         seed=8)
    assert np.array_equal(px(out.images[2])[:, 64:], green.pixels[0])


def test_xyz_seeds_fixed_varied_and_axes_in_a1111_order(pipe):
    plan = scripts.prepare("x/y/z plot", xyz_args(x=(1, "-1"), y=(4, "2,3"), vary_seeds_y=True), base(),
                           env())
    seeds = [r.params.seed for r in plan.runs]
    assert seeds[0] >= 0 and seeds[1] == seeds[0] + 1  # -1 fixed once; Y varies it
    plan = scripts.prepare("x/y/z plot", xyz_args(x=(4, "2,3"), no_fixed_seeds=True), base(), env(seed_random=True))
    assert plan.runs[0].params.seed != plan.runs[1].params.seed  # "Keep -1 for seeds": each cell its own
    t2i = [a.label for a in axes_for("txt2img")]
    assert t2i[:11] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
                        "Prompt S/R", "Prompt order", "Sampler", "Hires sampler"]
    assert t2i.index("Checkpoint name") == 11 and t2i.index("Schedule type") == 17 and t2i.index("Clip skip") == 25
    i2i = [a.label for a in axes_for("img2img")]
    assert i2i[5:8] == ["CFG Scale", "Image CFG Scale", "Prompt S/R"] and i2i.index("Denoising") == 25
    assert find_axis("cfg scale", "txt2img", "X").label == "CFG Scale"


@pytest.mark.parametrize("kind, text, want", [
    ("int", "1-5", [1, 2, 3, 4, 5]),
    ("int", "1-10 (+3)", [1, 4, 7, 10]),
    ("int", "10-1 (-3)", [10, 7, 4, 1]),
    ("int", "1-10 [4]", [1, 4, 7, 10]),
    ("int", "3, 1-2, 8", [3, 1, 2, 8]),
    ("float", "0.5-1.5 (+0.5)", [0.5, 1.0, 1.5]),
    ("float", "0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
    ("float", "5-7 [3]", [5.0, 6.0, 7.0]),
    ("str", '"a, b", c', ["a, b", "c"]),
])
def test_xyz_value_syntax(kind, text, want):
    axis = next(a for a in axes_for("txt2img") if a.type == kind and a.apply is not None)
    assert axis_values(axis, text, None, False, "X") == want


@pytest.mark.parametrize("args, words", [
    (xyz_args(x=(4, "2,x")), "X values (Steps): expected an integer, got 'x'"),
    (xyz_args(x=("VAE", "a")), "kiln cannot vary 'VAE' yet"),
    (xyz_args(x=(99, "1")), "99 is not an axis"),
    (xyz_args(x=(7, "purple,blue")), "in neither the prompt nor the negative prompt"),
    (xyz_args(x=(9, "Euler,Nonsense")), "unknown sampler"),
    (xyz_args(x=(5, "2,3")), "hires fix, which this request does not use"),
    (xyz_args(x=(4, "1-40")), "would render 40 images"),
    (xyz_args(x=(11, "nowhere.safetensors")), "unknown checkpoint"),
    (xyz_args() + [1], "takes 18 arguments"),
])
def test_xyz_bad_arguments_are_one_line_errors(args, words):
    with pytest.raises(KilnError) as e:
        scripts.prepare("x/y/z plot", args, base(), env(bounds=scripts.Bounds(max_images=16)))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_prompt_matrix_makes_every_combination(pipe):
    out = run(pipe, "Prompt Matrix", [False, False, "positive", "comma", 0], base(prompt="a circle|red|small"))
    assert out.grids == 1 and len(out.results) == 5
    assert [r.prompts[0] for r in out.results[1:]] == ["a circle", "a circle, red", "a circle, small",
                                                       "a circle, red, small"]
    assert {r.seeds[0] for r in out.results[1:]} == {5}  # one seed for all, as A1111 without "Random seeds"
    grid = out.images[0]
    assert grid.width - 128 == 48 and grid.height > 128  # 2 columns (red), 2 rows (small), labels at both sides
    plan = scripts.prepare("prompt matrix", [True, True, "negative", "space"], base(negative_prompt="x|y"), env())
    assert [(r.params.negative_prompt, r.params.seed) for r in plan.runs] == [("x", 5), ("y x", 6)]


def test_prompts_from_file_lines_and_their_options(pipe):
    text = 'a cat\n\n--prompt "a red dog" --negative_prompt blurry photo --steps 3 --seed 9 --cfg_scale 4\n' \
           "--prompt dog --sampler_name DDIM --width 32 --height 32\n"
    out = run(pipe, "prompts from file or textbox", [False, False, "start", text], base(prompt=""))
    assert [r.prompts[0] for r in out.results] == ["a cat", "a red dog", "dog"]
    first, second, third = out.infotexts
    assert "Seed: 5," in first and "Steps: 2," in first
    assert "Negative prompt: blurry photo" in second and "Steps: 3," in second and "Seed: 9," in second
    assert "CFG scale: 4," in second and "Sampler: DDIM" in third and out.images[2].size == (32, 32)
    want = pipe.txt2img("a red dog", negative_prompt="blurry photo", steps=3, seed=9, cfg_scale=4, sampler="euler",
                        width=64, height=64)
    assert np.array_equal(px(out.images[1]), want.pixels[0])
    plan = scripts.prepare("prompts from file or textbox", [True, False, "end", "x\ny"], base(batch_size=2), env())
    assert [(r.params.prompt, r.params.seed) for r in plan.runs] == [(f"{PROMPT} x", 5), (f"{PROMPT} y", 7)]


@pytest.mark.parametrize("text, words", [
    ("--steps", "line 1: --steps needs a value"),
    ("ok\n--prompt a --colour red", "line 2: unknown option --colour"),
    ("--outpath_samples /etc", "never names a server path"),
    ("--steps ten", "expected an integer"),
    ('--prompt "open', "line 1: No closing quotation"),
    ("--sd_model nowhere", "unknown checkpoint 'nowhere'"),
])
def test_prompts_from_file_bad_lines(text, words):
    with pytest.raises(KilnError) as e:
        scripts.prepare("prompts from file or textbox", [False, False, "start", text], base(), env())
    assert words in str(e.value)


def test_sd_upscale_doubles_the_picture(pipe):
    init = Image.new("RGB", (64, 64), (200, 40, 30))
    out = run(pipe, "sd upscale", ["", 8, "Lanczos", 2.0], base(init_image=init), mode="img2img")
    assert out.grids == 0 and [im.size for im in out.images] == [(128, 128)]
    assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in out.infotexts[0]
    plan = scripts.prepare("sd upscale", ["", 8, 1, 2], base(init_image=init, n_iter=2), env("img2img"))
    assert len(plan.runs) == 2 * 9 and plan.runs[9].params.seed == 6  # 3x3 tiles of 64 on 128 px, per pass
    with pytest.raises(KilnError, match="runs in img2img only"):
        scripts.prepare("sd upscale", [], base(), env())
    with pytest.raises(KilnError, match="index 7 is not one of kiln's upscalers"):
        scripts.prepare("sd upscale", ["", 8, 7, 2], base(init_image=init), env("img2img"))
    with pytest.raises(KilnError, match="overlap must be between 0 and 63"):
        scripts.prepare("sd upscale", ["", 64, "Lanczos", 2], base(init_image=init), env("img2img"))


def test_tiles_split_and_combine_back_exactly():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8))
    for tile, overlap in ((64, 8), (48, 16), (160, 0)):
        tiles, crops = split_tiles(picture, tile, tile, overlap)
        assert all(c.size == (tile, tile) for c in crops)
        assert np.array_equal(px(combine_tiles(tiles, crops)), px(picture))  # blending equal pixels changes none
    tiles, crops = split_tiles(Image.new("RGB", (128, 64)), 64, 64, 16)
    assert tiles.xs == [0, 32, 64]
    white = [Image.new("RGB", (64, 64), (255, 255, 255) if i % 2 else (0, 0, 0)) for i in range(3)]
    row = px(combine_tiles(tiles, white))[0, :, 0]
    assert row[31] == 0 and 0 < row[40] < 255 and row[48] == 255 and row[64 + 15] < 255  # linear seams


def test_unknown_script():
    with pytest.raises(KilnError, match="Script 'loopback' not found"):
        scripts.prepare("loopback", [], base(), env())
    assert scripts.names("txt2img") == ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]
    assert "sd upscale" in scripts.names("img2img")


# ---------------------------------------------------------------------------------------------- CLI
def cli(*args):
    from kiln.cli import main

    return main([*args, "--ddim_steps", "2", "--sampler", "euler", "--precision", "full", "--device", "cpu"])


def test_cli_xyz_saves_the_grid_and_the_cells_with_infotexts(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("txt2img", "--prompt", PROMPT, "--W", "64", "--H", "64", "--seed", "5", "--outdir", str(out),
               "--xyz", "Steps:2,3", "--xyz", "CFG Scale:5,7.5") == 0
    grid = Image.open(out / "grid-0000.png")
    assert grid.size == (176, grid.height) and 'X Values: "2,3"' in grid.info["parameters"]
    samples = sorted((out / "samples").iterdir())
    assert len(samples) == 4  # one image per cell: --n_samples and --n_iter default to 1 with a script
    assert "Steps: 3, " in Image.open(samples[3]).info["parameters"] and "CFG scale: 7.5," in \
        Image.open(samples[3]).info["parameters"]


def test_cli_sd_upscale_and_option_lines_in_from_file(tmp_path, capsys):
    init = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (20, 90, 200)).save(init)
    assert cli("img2img", "--init-img", str(init), "--W", "64", "--H", "64", "--sd-upscale", "2", "--overlap", "8",
               "--outdir", str(tmp_path / "up")) == 0
    (picture,) = sorted((tmp_path / "up" / "samples").iterdir())
    assert Image.open(picture).size == (128, 128) and not (tmp_path / "up" / "grid-0000.png").exists()
    lines = tmp_path / "lines.txt"
    lines.write_text('a blue square\n--prompt "a red dog" --steps 3 --seed 9\n')
    assert cli("txt2img", "--from-file", str(lines), "--W", "64", "--H", "64", "--outdir", str(tmp_path / "f")) == 0
    texts = [Image.open(p).info["parameters"] for p in sorted((tmp_path / "f" / "samples").iterdir())]
    assert texts[0].startswith("a blue square\n") and texts[1].startswith("a red dog\nSteps: 3,") and \
        "Seed: 9," in texts[1]


@pytest.mark.parametrize("args, words", [
    (["txt2img", "--xyz", "Steps"], "--xyz wants AXIS:VALUES"),
    (["txt2img", "--xyz", "Steps:1,2", "--prompt-matrix"], "one script at a time"),
    (["txt2img", "--xyz", "Sigma Churn:1,2"], "kiln cannot vary 'Sigma Churn' yet"),
    (["txt2img", "--script", "sd upscale"], "runs in img2img only"),
])
def test_cli_script_errors_are_one_line(args, words, tmp_path, capsys):
    assert cli(*args, "--outdir", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
