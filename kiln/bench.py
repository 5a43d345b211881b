"""`kiln bench`: kiln against diffusers on the same weights, measured side by side in one run.

Each side runs in a fresh process (so peak RSS and load time are its own) on the same weights file: random
full-size SD 1.5 weights built once and cached (or `--weights`, a real CompVis file). Reported as kiln/diffusers
ratios (> 1 is better for kiln): UNet step (batch 2 = classifier-free guidance), VAE decode, txt2img (DDIM),
load time; peak memory (RSS on CPU, `max_memory_allocated` on CUDA) as kiln/diffusers (< 1 is better); and the
largest difference between the two images before quantisation.

diffusers and transformers are test-only dependencies; the diffusers side is built the way `from_single_file`
builds it (diffusers' own single-file converters), without the hub.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import cache
from .errors import KilnError

PROMPT = "a photograph of an astronaut riding a horse"
# The facts of CompVis' v1-inference.yaml that diffusers' converters read.
V1_ORIGINAL = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64, "scale_factor": 0.18215,
    "unet_config": {"params": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                               "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                               "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
                               "context_dim": 768, "use_checkpoint": True, "legacy": False}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}


def cache_dir() -> Path:
    return cache.cache_dir("bench")


def random_weights(path: Path) -> Path:
    """Random full-size SD 1.5 weights in the CompVis layout (4.3 GB fp32): each tensor N(0, 1/fan_in), norm
    scales about 1, so activations stay in range and both implementations do real work."""
    from safetensors.torch import save_file

    from .models import LatentDiffusion, ModelConfig

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(ModelConfig()).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        if len(shape) == 1:
            norm = any(s in k for s in ("norm", "in_layers.0", "out_layers.0", "out.0."))
            x = x.mul_(0.1).add_(1.0) if k.endswith(".weight") and norm else x.mul_(0.05)
        elif "embedding" in k:
            x = x.mul_(0.5)
        else:
            x = x.mul_(x[0].numel() ** -0.5)
        state[k] = x
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, repeat, device):
    """Median wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- the two sides (each in its own process)

def run_kiln(opt, device, dtype) -> dict:
    from .pipeline import load, randn, generators

    t = time.perf_counter()
    pipe = load(opt.weights, device=str(device), precision="full" if dtype == torch.float32 else "autocast",
                channels_last=True if opt.channels_last else None, prepack=False if opt.no_prepack else "auto",
                offload=opt.offload, backend="openvino" if opt.openvino else "torch")
    if opt.compile:
        pipe.compile()
    if opt.deepcache:
        pipe.set_deepcache(opt.deepcache)
    load_s = time.perf_counter() - t
    h = w = opt.size // 8
    with torch.no_grad():
        cond, uncond = pipe.conditioning([PROMPT], [""])
        eps_fn = pipe.eps_fn(cond, uncond, 7.5)
        x = randn((4, h, w), generators([1]), device)
        t = time.perf_counter()
        eps_fn(x, 500)  # the first call includes any compilation
        first_s = time.perf_counter() - t
        unet_s = _timed(lambda: eps_fn(x, 500), opt.repeat, device)
        vae_s = _timed(lambda: pipe.decode_latents(x), max(1, opt.repeat // 2), device)
        t = time.perf_counter()
        r = pipe.txt2img(PROMPT, steps=opt.steps, sampler="ddim", cfg_scale=7.5, width=opt.size, height=opt.size,
                         seed=42)
        txt2img_s = time.perf_counter() - t
        image = ((pipe.decode_latents(r.latents) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    np.save(opt.image_out, image)
    return dict(load_s=load_s, first_call_s=first_s, unet_step_s=unet_s, vae_decode_s=vae_s, txt2img_s=txt2img_s,
                peak_bytes=_peak_bytes(device))


def _diffusers_pipeline(weights, device, dtype, tokenizer_dir: Path):
    """diffusers' StableDiffusionPipeline from a CompVis file, through diffusers' own single-file converters."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ckpt = load_file(str(weights), device=str(device) if device.type != "mps" else "cpu")
    ckpt = {k: v.to(device, dtype) if v.is_floating_point() else v for k, v in ckpt.items()}
    ucfg = create_unet_diffusers_config_from_ldm(V1_ORIGINAL, ckpt)
    vcfg = create_vae_diffusers_config_from_ldm(V1_ORIGINAL, ckpt)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**vcfg)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                            eos_token_id=49407, pad_token_id=1))
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), assign=True)
    tsd = {k: v for k, v in convert_ldm_clip_checkpoint(ckpt).items() if not k.endswith("position_ids")}
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        tsd = {k.removeprefix("text_model."): v for k, v in tsd.items()}
    text.load_state_dict(tsd, strict=False, assign=True)
    emb = text.text_model.embeddings if hasattr(text, "text_model") else text.embeddings
    if hasattr(emb, "position_ids"):
        emb.position_ids = torch.arange(77, device=device)[None]
    del ckpt
    hf_tokenizer_files(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77, pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hf_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, from the BPE merges kiln ships (written once)."""
    import gzip

    from .tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "merges.txt").is_file():
        return folder
    raw = gzip.open(Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    merges = raw.split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def run_diffusers(opt, device, dtype) -> dict:
    from .pipeline import generators, randn

    t = time.perf_counter()
    pipe = _diffusers_pipeline(opt.weights, device, dtype, cache_dir() / "tokenizer")
    load_s = time.perf_counter() - t
    h = w = opt.size // 8
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True, "")
        ctx = torch.cat([uncond, cond])
        x = randn((4, h, w), generators([1]), device, dtype)
        tt = torch.tensor([500, 500], device=device)

        def step():
            out_u, out_c = pipe.unet(torch.cat([x, x]), tt, encoder_hidden_states=ctx).sample.float().chunk(2)
            return out_u + 7.5 * (out_c - out_u)

        t = time.perf_counter()
        step()
        first_s = time.perf_counter() - t
        unet_s = _timed(step, opt.repeat, device)
        vae_s = _timed(lambda: pipe.vae.decode(x / 0.18215).sample, max(1, opt.repeat // 2), device)
        latents = randn((4, h, w), generators([42]), device, dtype)  # kiln's seed rule, so both start alike
        t = time.perf_counter()
        image = pipe(prompt=PROMPT, negative_prompt="", height=opt.size, width=opt.size,
                     num_inference_steps=opt.steps, guidance_scale=7.5, eta=0.0, latents=latents,
                     output_type="np").images
        txt2img_s = time.perf_counter() - t
    np.save(opt.image_out, image)
    return dict(load_s=load_s, first_call_s=first_s, unet_step_s=unet_s, vae_decode_s=vae_s, txt2img_s=txt2img_s,
                peak_bytes=_peak_bytes(device))


# ---------------------------------------------------------------- the driver

def _worker_main(argv):
    import argparse

    p = argparse.ArgumentParser()
    for a in ("--side", "--weights", "--device", "--dtype", "--image-out"):
        p.add_argument(a, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--repeat", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--openvino", action="store_true")
    p.add_argument("--channels-last", dest="channels_last", action="store_true")
    p.add_argument("--no-prepack", dest="no_prepack", action="store_true")
    p.add_argument("--offload", default=None)
    p.add_argument("--deepcache", type=int, default=None)
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = torch.device(opt.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[opt.dtype]
    result = (run_kiln if opt.side == "kiln" else run_diffusers)(opt, device, dtype)
    print("KILN_BENCH " + json.dumps(result), flush=True)


def run_side(side, weights, opt, device, image_out, flags=()) -> dict:
    cmd = [sys.executable, "-m", "kiln.bench", "--side", side, "--weights", str(weights), "--device", str(device),
           "--dtype", opt.dtype, "--size", str(opt.size), "--steps", str(opt.steps), "--repeat", str(opt.repeat),
           "--threads", str(opt.threads or 0), "--image-out", str(image_out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("KILN_BENCH ")]
    if r.returncode != 0 or not lines:
        raise KilnError(f"bench: the {side} run failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("KILN_BENCH "):])


def bench(opt) -> dict:
    from .pipeline import pick_device

    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise KilnError("kiln bench compares against diffusers: pip install diffusers transformers") from None
    if opt.size % 8:
        raise KilnError(f"--size must be a multiple of 8, got {opt.size}")
    device = pick_device(opt.device)
    if getattr(opt, "openvino", False):
        from .pipeline.openvino_backend import check_openvino

        check_openvino(device)
    if opt.weights:
        weights = Path(opt.weights)
        if not weights.is_file():
            raise KilnError(f"--weights {weights}: no such file")
    else:
        weights = cache_dir() / "sd15-random-fp32.safetensors"
        if not weights.is_file():
            print(f"kiln bench: writing random full-size SD 1.5 weights to {weights} (once; 4.3 GB)", file=sys.stderr)
        random_weights(weights)
    work = cache_dir() / "run"
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    variants = [("diffusers", "diffusers", ()), ("kiln", "kiln", ())]
    if getattr(opt, "channels_last", False):
        variants.append(("kiln --channels-last", "kiln", ("--channels-last",)))
    if getattr(opt, "no_prepack", False):
        variants.append(("kiln --no-prepack", "kiln", ("--no-prepack",)))
    if getattr(opt, "deepcache", None):
        variants.append((f"kiln --deepcache {opt.deepcache}", "kiln", ("--deepcache", str(opt.deepcache))))
    for mode in ("medvram", "lowvram"):
        if getattr(opt, mode, False):
            if device.type == "cpu":
                raise KilnError(f"--{mode} measures GPU memory; it needs --device cuda (or mps)")
            variants.append((f"kiln --{mode}", "kiln", ("--offload", mode)))
    if opt.compile:
        variants.append(("kiln --compile", "kiln", ("--compile",)))
    if getattr(opt, "openvino", False):
        variants.append(("kiln --backend openvino", "kiln", ("--openvino",)))
    for name, side, flags in variants:
        print(f"kiln bench: {name} …", file=sys.stderr)
        runs[name] = run_side(side, weights, opt, device, work / f"{name.replace(' ', '_')}.npy", flags)
    images = {n: np.load(work / f"{n.replace(' ', '_')}.npy") for n in runs}
    ref = runs["diffusers"]
    report = {"device": str(device), "dtype": opt.dtype, "size": opt.size, "steps": opt.steps,
              "threads": opt.threads or torch.get_num_threads(), "weights": str(weights), "runs": runs,
              "ratios": {}, "ratios_vs_kiln": {}, "max_abs_diff": {}}
    for name in runs:
        if name == "diffusers":
            continue
        r = runs[name]
        report["ratios"][name] = {
            "unet_step_speedup": ref["unet_step_s"] / r["unet_step_s"],
            "txt2img_speedup": ref["txt2img_s"] / r["txt2img_s"],
            "vae_decode_speedup": ref["vae_decode_s"] / r["vae_decode_s"],
            "load_speedup": ref["load_s"] / r["load_s"],
            "peak_memory_ratio": r["peak_bytes"] / ref["peak_bytes"]}
        report["max_abs_diff"][name] = float(np.abs(images[name].astype(np.float64) - images["diffusers"]).max())
        if name != "kiln":  # a kiln option against kiln's default path
            report["ratios_vs_kiln"][name] = {k: runs["kiln"][k] / r[k] for k in ("unet_step_s", "txt2img_s")}
    print(format_report(report))
    if opt.json:
        Path(opt.json).write_text(json.dumps(report, indent=2))
    return report


def format_report(rep) -> str:
    rows = [("UNet step (batch 2)", "unet_step_s", "s"), ("VAE decode", "vae_decode_s", "s"),
            (f"txt2img ({rep['steps']} DDIM steps)", "txt2img_s", "s"), ("load", "load_s", "s"),
            ("first UNet call", "first_call_s", "s"), ("peak memory", "peak_bytes", "GB")]
    names = list(rep["runs"])
    out = [f"kiln bench: SD 1.5 {rep['size']}x{rep['size']} {rep['dtype']} on {rep['device']} "
           f"({rep['threads']} threads)", ""]
    out.append(f"{'':28}" + "".join(f"{n:>22}" for n in names))
    for label, key, unit in rows:
        vals = [rep["runs"][n][key] / (1e9 if unit == "GB" else 1) for n in names]
        out.append(f"{label:28}" + "".join(f"{v:>20.3f}{unit:>2}" for v in vals))
    out.append(f"{'UNet it/s (CFG steps/s)':28}"
               + "".join(f"{1 / rep['runs'][n]['unet_step_s']:>22.2f}" for n in names))
    out.append("")
    for name, r in rep["ratios"].items():
        out.append(f"{name} vs diffusers: UNet step {r['unet_step_speedup']:.2f}x, "
                   f"txt2img {r['txt2img_speedup']:.2f}x, VAE decode {r['vae_decode_speedup']:.2f}x, "
                   f"load {r['load_speedup']:.2f}x faster; peak memory "
                   f"{r['peak_memory_ratio']:.2f}x; image max |diff| {rep['max_abs_diff'][name]:.2e}")
    for name, r in rep.get("ratios_vs_kiln", {}).items():
        out.append(f"{name} vs kiln: UNet step {r['unet_step_s']:.2f}x, txt2img {r['txt2img_s']:.2f}x faster")
    return "\n".join(out)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
