"""End to end: `kiln txt2img` on random full-size SD 1.5 weights equals diffusers' StableDiffusionPipeline
(DDIM, eta 0, the same start latents) within 1/255 on >= 99.9% of pixel values, for every file layout."""
import gc

import numpy as np
import pytest
import torch
from PIL import Image

import sdref
from kiln.cli import main
from kiln.pipeline import generators, randn

pytestmark = pytest.mark.slow
STEPS = 5  # DDIM steps (a divisor of 1000: otherwise CompVis' uniform discretisation, which kiln keeps, takes one step
# more than diffusers' "leading" spacing, and the two schedules differ)


def run_kiln(tmp_path, ckpt, *extra, prompt="a red cube on a blue table", n=2, steps=STEPS):
    out = tmp_path / "out"
    rc = main(["txt2img", "--ckpt", str(ckpt), "--prompt", prompt, "--outdir", str(out), "--H", "64", "--W", "64",
               "--ddim_steps", str(steps), "--scale", "7.5", "--seed", "42", "--no-watermark", "--n_samples", str(n),
               "--n_iter", "1", "--precision", "full", *extra])
    assert rc == 0
    gc.collect()
    return np.stack([np.asarray(Image.open(out / "samples" / f"{i:05}.png")) for i in range(n)]), out


def run_diffusers(sd15, state, prompt="a red cube on a blue table", negative=None, n=2, steps=STEPS,
                  extract_ema=False, vae=None):
    pipe = sdref.ref_pipeline(state, sd15["tokenizer"], extract_ema=extract_ema)
    if vae is not None:  # e.g. an AutoencoderTiny (TAESD)
        pipe.vae = vae
    latents = randn((4, 8, 8), generators([42 + i for i in range(n)]), "cpu")  # kiln's documented seed rule
    with torch.no_grad():
        images = pipe(prompt=[prompt] * n, negative_prompt=[negative] * n if negative else None, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=7.5, eta=0.0, latents=latents, output_type="np").images
    del pipe
    gc.collect()
    return images  # float in [0, 1]


def assert_pixels_match(ours_u8, ref_float):
    diff = np.abs(ours_u8.astype(np.float64) / 255.0 - ref_float.astype(np.float64))
    close = (diff <= 1.0 / 255.0 + 1e-6).mean()
    assert close >= 0.999, f"only {close:.4%} of pixel values within 1/255 (max diff {diff.max() * 255:.1f}/255)"
    assert ref_float.std() > 0.05  # a real picture, not a flat one


@pytest.fixture(scope="module")
def fp16_run(sd15, tmp_path_factory):
    """kiln on the fp16 .safetensors file and diffusers on the same weights: shared by the tests below (each run
    loads 4.3 GB of weights; CI time matters)."""
    ours, out = run_kiln(tmp_path_factory.mktemp("fp16"), sd15["fp16"])
    return ours, out, run_diffusers(sd15, sdref.load_float(sd15["fp16"]))


def test_e2e_safetensors_fp16(fp16_run):
    ours, out, ref = fp16_run
    assert (out / "grid-0000.png").exists()
    assert_pixels_match(ours, ref)


def test_e2e_negative_prompt(sd15, tmp_path, fp16_run):
    ours, _ = run_kiln(tmp_path, sd15["fp16"], "--negative-prompt", "green, blurry")
    ref = run_diffusers(sd15, sdref.load_float(sd15["fp16"]), negative="green, blurry")
    assert_pixels_match(ours, ref)
    plain = fp16_run[0]
    assert (plain != ours).mean() > 0.5  # the negative prompt really changed the image


def test_e2e_diffusers_folder(sd15, tmp_path, fp16_run):
    ours, _ = run_kiln(tmp_path, sd15["diffusers"])
    assert_pixels_match(ours, fp16_run[2])


@pytest.fixture(scope="module")
def ckpt_refs(sd15):
    """diffusers on the .ckpt, converted with and without `extract_ema` (each test needs both)."""
    from kiln.checkpoints.safe_pickle import load_pickle_checkpoint

    state = {k: v.float() for k, v in load_pickle_checkpoint(sd15["ckpt"])["state_dict"].items()}
    return {ema: run_diffusers(sd15, state, extract_ema=ema) for ema in (True, False)}


@pytest.mark.parametrize("ema", ["on", "off"])
def test_e2e_ckpt_ema(sd15, tmp_path, ema, ckpt_refs):
    ours, _ = run_kiln(tmp_path, sd15["ckpt"], "--ema", ema)
    assert_pixels_match(ours, ckpt_refs[ema == "on"])
    assert np.abs(ours / 255.0 - ckpt_refs[ema != "on"]).mean() > 0.01  # EMA and raw weights give different pictures



# ------------------------------------------------------------------ few-step samplers and schedules
# kiln's Pipeline and one diffusers pipeline, each loaded once; the diffusers scheduler is swapped per test.
FEW_STEPS = 4  # distilled models' usual count (divides 1000: diffusers' DDIM steps back 1000 // n)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def few_step_pipes(sd15):
    import kiln

    ours = kiln.load(sd15["fp16"], device="cpu", precision="full")
    ref = sdref.ref_pipeline(sdref.load_float(sd15["fp16"]), sd15["tokenizer"])
    gc.collect()
    yield ours, ref
    del ours, ref
    gc.collect()


def ays_sigmas(n):
    """A1111's Align Your Steps at n steps, written out here from NVIDIA's SD 1.5 list."""
    published = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    levels = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(published[::-1])))[::-1]
    return [*levels.tolist(), 0.0]


def reference_scheduler(case):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, TCDScheduler

    if case == "tcd":
        return TCDScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False), {"eta": 0.3}
    if case == "ddim-trailing":
        return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             timestep_spacing="trailing"), {"eta": 0.0}
    # Euler: trailing spacing starts from σ_max·z (leading would start from √(σ_max² + 1)·z)
    sched = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="trailing")
    return sched, ({"sigmas": ays_sigmas(FEW_STEPS)} if case == "euler-ays" else {})


@pytest.mark.parametrize("case,sampler,schedule,eta", [
    ("tcd", "tcd", None, 0.3), ("euler-ays", "euler", "align_your_steps", None),
    ("ddim-trailing", "ddim", "trailing", None), ("euler-trailing", "euler", "trailing", None)])
def test_few_step_sampling_matches_diffusers(few_step_pipes, case, sampler, schedule, eta):
    """TCD (γ 0.3: its fresh noise drawn from each image's generator after the start latents, in both), Euler on
    Align Your Steps' σ, DDIM and Euler with trailing spacing: 4 steps, the same start latents."""
    ours, ref = few_step_pipes
    prompt, n = "a red cube on a blue table", 2
    res = ours.txt2img(prompt, steps=FEW_STEPS, sampler=sampler, schedule=schedule, eta=eta, cfg_scale=7.5, seed=42,
                       batch_size=n, width=64, height=64, watermark=False)
    ref.scheduler, kw = reference_scheduler(case)
    gens = generators([42 + i for i in range(n)])
    latents = randn((4, 8, 8), gens, "cpu")
    if "sigmas" not in kw:
        kw["num_inference_steps"] = FEW_STEPS
    with torch.no_grad():
        images = ref(prompt=[prompt] * n, height=64, width=64, guidance_scale=7.5, latents=latents, generator=gens,
                     output_type="np", **kw).images
    assert_pixels_match(res.pixels, images)


@pytest.fixture(scope="module")
def taesd(sd15, tmp_path_factory, fp16_run):
    """Random TAESD weights in every layout, and diffusers' pipeline decoding with an AutoencoderTiny of them."""
    import taesdref

    decoder = taesdref.random_part("decoder", seed=4)
    files = taesdref.write_layouts(tmp_path_factory.mktemp("taesd"), decoder)
    ref = run_diffusers(sd15, sdref.load_float(sd15["fp16"]), vae=taesdref.diffusers_tiny(decoder))
    return files, ref


@pytest.mark.parametrize("layout", ["pth", "safetensors", "diffusers"])
def test_e2e_taesd_decoder(sd15, tmp_path, taesd, fp16_run, layout):
    files, ref = taesd
    ours, out = run_kiln(tmp_path, sd15["fp16"], "--decoder", str(files[layout]))
    assert_pixels_match(ours, ref)
    assert np.abs(ours / 255.0 - fp16_run[2]).mean() > 0.05  # TAESD, not the VAE, made these pixels
    assert "VAE Decoder: TAESD" in Image.open(out / "samples" / "00000.png").info["parameters"]
