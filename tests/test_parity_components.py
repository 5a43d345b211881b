"""Numerical parity of kiln's SD 1.5 with diffusers/transformers on random full-size weights.

The references are built with diffusers' own single-file converters from the CompVis-layout files of the
`sd15` fixture, so our key naming is checked independently of our own loader."""
import gc

import pytest
import torch
from safetensors.torch import load_file

import sdref
from kiln.checkpoints import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_pair(sd15):
    ours, info = load_model(sd15["fp32"])
    ref_state = load_file(sd15["fp32"])
    yield ours, ref_state
    del ours, ref_state
    gc.collect()


def test_clip_parity(fp32_pair):
    ours, state = fp32_pair
    ref = sdref.ref_clip(state)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 49406, (3, 77), generator=gen)
    ids[:, 0], ids[:, 12:] = 49406, 49407
    with torch.no_grad():
        a = ours.text_model(ids)
        out = ref(ids, output_hidden_states=True)
        assert a.std() > 0.5  # real signal, not zeros
        assert (a - out.last_hidden_state).abs().max() <= 1e-5
        assert (ours.text_model(ids, skip=1) - out.hidden_states[-2]).abs().max() <= 1e-5


def test_unet_parity(fp32_pair):
    ours, state = fp32_pair
    ref = sdref.ref_unet(state)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        a = ours.unet(x, t, ctx)
        b = ref(x, t, encoder_hidden_states=ctx).sample
    assert 0.5 < a.std() < 2.0  # ε at unit scale
    assert (a - b).abs().max() <= 1e-4
    del ref


def test_vae_parity(fp32_pair):
    ours, state = fp32_pair
    ref = sdref.ref_vae(state)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    img = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        dec = ours.vae.decode(z)
        assert 0.2 < dec.std() < 1.0
        assert (dec - ref.decode(z).sample).abs().max() <= 1e-4
        mean, logvar = ours.vae.encode(img)
        dist = ref.encode(img).latent_dist
        assert (mean - dist.mean).abs().max() <= 1e-4
        assert (logvar - dist.logvar).abs().max() <= 1e-4


def test_loading_holds_one_copy_of_the_weights(sd15):
    """Peak RSS of a fresh process loading the 4.3 GB fp32 file stays under 1.5x the model's size."""
    import json
    import subprocess
    import sys

    # VmHWM (peak RSS of this process's own address space); ru_maxrss would carry over the forking parent's size.
    code = ("import json, torch; from kiln.checkpoints import load_model; "
            f"m, _ = load_model({str(sd15['fp32'])!r}); "
            "n = sum(p.numel() * p.element_size() for p in m.parameters()); "
            "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(json.dumps([n, hwm]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    model_bytes, peak = json.loads(r.stdout.strip().splitlines()[-1])
    assert model_bytes > 4.2e9
    assert peak < 1.5 * model_bytes, f"peak RSS {peak / 1e9:.2f} GB for a {model_bytes / 1e9:.2f} GB model"


def test_kohya_lora_matches_diffusers_load_lora_weights(fp32_pair, sd15, tmp_path):
    """A random kohya LoRA (UNet in diffusers' names, text encoder in Hugging Face's, alpha/rank 0.5) merged by kiln
    equals diffusers' `load_lora_weights` on the same weights; weight 0 changes nothing; removal is exact."""
    from safetensors.torch import save_file

    from kiln.pipeline import Pipeline

    ours, state = fp32_pair
    pipe = Pipeline(ours, None, torch.device("cpu"), torch.float32)
    params = dict(ours.named_parameters())
    path = tmp_path / "sd15-lora.safetensors"
    lora_sd = sdref.random_kohya_lora(sdref.kohya_modules({k: v.shape for k, v in params.items()}, ours.cfg))
    save_file(lora_sd, str(path))
    lora = pipe.load_lora(path)
    assert lora.unmatched == [] and len(lora.patches) == len(lora_sd) // 3
    before = {k: params[k].detach().clone() for k in {p.key for p in lora.patches}}

    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    ids[:, 0], ids[:, 20:] = 49406, 49407
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen), torch.tensor([700, 40])

    def probe(text, unet):
        with torch.no_grad():
            return text(ids), unet(x, t, ctx)

    plain = probe(ours.text_model, ours.unet)
    pipe.set_loras([(lora, 0.0, 0.0)])
    assert all(torch.equal(params[k], v) for k, v in before.items())
    pipe.set_loras([(lora, 1.0, 1.0)])
    mine = probe(ours.text_model, ours.unet)
    pipe.set_loras([])
    assert all(torch.equal(params[k], v) for k, v in before.items())

    ref = sdref.ref_pipeline(state, sd15["tokenizer"])
    ref.load_lora_weights(lora_sd)
    # The lambdas run before `del ref` below; ruff's F821 misreads that as a use after the del (astral-sh/ruff#9858).
    theirs = probe(lambda i: ref.text_encoder(i).last_hidden_state, lambda *a: ref.unet(*a).sample)  # noqa: F821
    for a, b, p0 in zip(mine, theirs, plain):
        assert (a - p0).abs().max() > 0.05  # the LoRA really changed the output
        assert (a - b).abs().max() <= 1e-4
    del ref, pipe


# LCM-LoRA's target modules (latent-consistency/lcm-lora-sdv1-5's adapter config): attention, feed-forward,
# resnet convolutions (3x3), shortcuts, time embeddings, transformer projections, down/up-samplers
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def lcm_lora_file(path, params, nrb):
    """A random LCM-LoRA-style file as diffusers' `save_lora_weights` writes it: PEFT keys (`unet.….lora_A/B`), the
    alphas in the `lora_adapter_metadata` header (lora_alpha 8 on rank 4, an alpha_pattern of 2 on ff.net.2).
    → {our key: the diffusers name of its module}."""
    import json

    from safetensors.torch import save_file

    from kiln.checkpoints.diffusers_keys import unet_key

    gen = torch.Generator().manual_seed(21)
    sd, modules = {}, {}
    for key, p in sorted(params.items()):
        if not key.startswith("model.diffusion_model.") or not key.endswith(".weight") or p.ndim not in (2, 4):
            continue
        try:
            name = unet_key(key[len("model.diffusion_model."):], nrb)[:-len(".weight")]
        except KeyError:
            continue
        if not name.endswith(LCM_TARGETS):
            continue
        out, inp, *kernel = p.shape
        fan = inp * (kernel[0] * kernel[1] if kernel else 1)
        sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, inp, *kernel, generator=gen) * fan ** -0.5
        sd[f"unet.{name}.lora_B.weight"] = torch.randn(out, 4, *([1, 1] if kernel else []), generator=gen) * 0.05
        modules[key] = name
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"ff.net.2": 2},
            "unet.target_modules": sorted(modules.values())}
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return modules


def test_lcm_lora_peft_file_fuses_like_diffusers(fp32_pair, sd15, tmp_path):
    """kiln's merge of a PEFT-named LoRA with its alphas in the metadata equals diffusers' `load_lora_weights` +
    `fuse_lora` weight for weight (convolutions included); removal is exact."""
    from kiln.pipeline import Pipeline

    ours, state = fp32_pair
    pipe = Pipeline(ours, None, torch.device("cpu"), torch.float32)
    params = dict(ours.named_parameters())
    path = tmp_path / "lcm-lora-sd15.safetensors"
    modules = lcm_lora_file(path, params, ours.cfg.unet.num_res_blocks)
    assert len(modules) > 200 and any(params[k].ndim == 4 for k in modules)
    lora = pipe.load_lora(path)
    assert lora.unmatched == [] and sorted(p.key for p in lora.patches) == sorted(modules)
    before = {k: params[k].detach().clone() for k in modules}
    pipe.set_loras([(lora, 1.0, 1.0)])
    mine = {k: params[k].detach().clone() for k in modules}
    pipe.set_loras([])
    assert all(torch.equal(params[k], v) for k, v in before.items())

    ref = sdref.ref_pipeline(state, sd15["tokenizer"])
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    theirs = dict(ref.unet.named_parameters())
    for key, name in modules.items():
        t = theirs[name + ".weight"] if name + ".weight" in theirs else theirs[name + ".base_layer.weight"]
        assert (mine[key] - before[key]).abs().max() > 1e-3, key  # the LoRA changed it
        assert (mine[key] - t.detach()).abs().max() <= 1e-5, key
    del ref, pipe


def test_textual_inversion_matches_diffusers_load_textual_inversion(fp32_pair, sd15, tmp_path):
    """A random two-vector embedding (A1111's .safetensors layout), used by its file name, conditions exactly as
    diffusers' `load_textual_inversion` makes it condition."""
    from safetensors.torch import save_file

    from kiln.pipeline import Pipeline

    ours, state = fp32_pair
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(9)) * 0.4
    save_file({"emb_params": vectors}, str(folder / "kilnstyle.safetensors"))
    prompt = "a photo of kilnstyle on a table"
    pipe = Pipeline(ours, None, torch.device("cpu"), torch.float32)
    plain = pipe.encode_prompts([prompt])
    pipe.embeddings_dir = folder
    mine = pipe.encode_prompts([prompt])
    assert (mine - plain).abs().max() > 0.1  # the embedding is used

    ref = sdref.ref_pipeline(state, sd15["tokenizer"])
    ref.load_textual_inversion(str(folder / "kilnstyle.safetensors"), token="kilnstyle")
    with torch.no_grad():
        theirs = ref.encode_prompt(prompt, "cpu", 1, False)[0]
    assert (mine - theirs).abs().max() <= 1e-4
    del ref, pipe
