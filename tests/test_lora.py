"""LoRA: kohya (diffusers and CompVis module names), LoCon convolutions and PEFT files merge to the published
formula W + w · alpha/rank · up @ down; prompt tags; clean removal; infotext hashes; bad files."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kiln.checkpoints.diffusers_keys import unet_key
from kiln.errors import KilnError
from kiln.pipeline.lora import apply_networks

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."


def targets(pipe):
    """A cross-attention projection, the feed-forward output, a 3x3 convolution (LoCon) and a text-encoder
    projection: our keys and their shapes."""
    params = dict(pipe.model.named_parameters())
    pick = [next(k for k in params if k.endswith(s)) for s in
            ("attn2.to_k.weight", "ff.net.2.weight", "in_layers.2.weight", "self_attn.q_proj.weight")]
    return {k: params[k].shape for k in pick}


def low_rank(shapes, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for key, shape in shapes.items():
        out, inp = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down = torch.randn((rank, inp, *kernel), generator=g) * 0.3
        up = torch.randn((out, rank, *([1] * len(kernel))), generator=g) * 0.3
        pairs[key] = (up, down)
    return pairs


def kohya_name(key, num_res_blocks, spelling):
    if key.startswith(UNET):
        ours = key[len(UNET):-len(".weight")]
        name = ours if spelling == "compvis" else unet_key(ours + ".weight", num_res_blocks)[:-len(".weight")]
        return "lora_unet_" + name.replace(".", "_")
    return "lora_te_" + key[len(TE):-len(".weight")].replace(".", "_")


def write_kohya(path, pairs, num_res_blocks, spelling, alpha):
    sd = {}
    for key, (up, down) in pairs.items():
        name = kohya_name(key, num_res_blocks, spelling)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))


def write_peft(path, pairs, num_res_blocks, scale):
    sd = {}
    for key, (up, down) in pairs.items():
        if key.startswith(UNET):
            name = "unet." + unet_key(key[len(UNET):], num_res_blocks)[:-len(".weight")]
        else:
            name = "text_encoder." + key[len(TE):-len(".weight")]
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up * scale  # PEFT files carry no alpha
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    pairs = low_rank(targets(pipe))
    nrb = pipe.cfg.unet.num_res_blocks
    write_kohya(d / "kohya.safetensors", pairs, nrb, "diffusers", alpha=2)  # alpha 2, rank 4: scale 0.5
    write_kohya(d / "compvis.safetensors", pairs, nrb, "compvis", alpha=2)
    write_peft(d / "peft.safetensors", pairs, nrb, scale=0.5)
    return d, pairs


def test_every_format_merges_to_the_published_formula(pipe, files):
    d, pairs = files
    original = {k: v.detach().clone() for k, v in pipe.model.named_parameters()}
    for name in ("kohya", "compvis", "peft"):
        lora = pipe.load_lora(d / f"{name}.safetensors")
        assert sorted(p.key for p in lora.patches) == sorted(pairs) and not lora.unmatched
        pipe.set_loras([(lora, 0.6, 0.8)])
        params = dict(pipe.model.named_parameters())
        for key, (up, down) in pairs.items():
            w = 0.6 if key.startswith("cond_stage_model.") else 0.8
            want = original[key] + w * 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(original[key].shape)
            torch.testing.assert_close(params[key].detach(), want, rtol=0, atol=1e-6)
        untouched = next(k for k in original if k not in pairs and k.endswith(".weight"))
        assert torch.equal(params[untouched], original[untouched])
        pipe.set_loras([])
        assert all(torch.equal(v, original[k]) for k, v in pipe.model.named_parameters())  # exact removal


def peft_name(key, num_res_blocks):
    """(part prefix, module name) as diffusers and PEFT name our weight `key`."""
    if key.startswith(UNET):
        return "unet", unet_key(key[len(UNET):], num_res_blocks)[:-len(".weight")]
    return "text_encoder", "text_model." + key[len(TE):-len(".weight")].removeprefix("text_model.")


def write_distilled(folder, pairs, nrb, layout):
    """LoRA files of distilled adapters (LCM-LoRA, Hyper-SD, TCD-LoRA) as diffusers and PEFT write them, each with
    its alpha somewhere else: → {our key: the scale alpha/rank it must merge with}."""
    import json

    folder.mkdir()
    sd, scales, meta = {}, {}, None
    for key, (up, down) in pairs.items():
        part, module = peft_name(key, nrb)
        rank = down.shape[0]
        if layout == "alpha-keys":  # PEFT names with kohya's per-module alpha (converted files)
            name = f"{part}.{module}"
            sd[f"{name}.alpha"] = torch.tensor(3.0)
            scales[key] = 3.0 / rank
        elif layout == "metadata":  # diffusers' save_lora_weights: alpha in the safetensors metadata
            name = f"{part}.{module}"
            scales[key] = (2.0 if "ff.net" in module else 8.0) / rank if part == "unet" else 4.0 / rank ** 0.5
        else:  # PEFT's save_pretrained of the UNet alone: base_model.model.…, adapter_config.json beside it
            if part != "unet":
                continue
            name = f"base_model.model.{module}"
            scales[key] = 6.0 / rank
        tag = ".default" if layout == "metadata" else ""
        sd[f"{name}.lora_A{tag}.weight"], sd[f"{name}.lora_B{tag}.weight"] = down, up
    if layout == "metadata":
        meta = {"lora_adapter_metadata": json.dumps({
            "unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"ff.net.2": 2},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True})}
    if layout == "peft":
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 6}))
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata=meta)
    return scales


@pytest.mark.parametrize("layout", ["alpha-keys", "metadata", "peft"])
def test_distilled_adapter_layouts_merge_with_their_alpha(pipe, files, tmp_path, layout):
    _, pairs = files
    scales = write_distilled(tmp_path / layout, pairs, pipe.cfg.unet.num_res_blocks, layout)
    original = {k: v.detach().clone() for k, v in pipe.model.named_parameters()}
    lora = pipe.load_lora(tmp_path / layout / "adapter_model.safetensors")
    assert sorted(p.key for p in lora.patches) == sorted(scales) and not lora.unmatched
    pipe.set_loras([(lora, 1.0, 0.7)])
    params = dict(pipe.model.named_parameters())
    for key, scale in scales.items():
        up, down = pairs[key]
        w = 1.0 if key.startswith("cond_stage_model.") else 0.7
        want = original[key] + w * scale * (up.flatten(1) @ down.flatten(1)).reshape(original[key].shape)
        torch.testing.assert_close(params[key].detach(), want, rtol=0, atol=1e-6)
    pipe.set_loras([])


def test_prompt_tags_apply_and_are_removed_between_runs(pipe, files):
    d, _ = files
    pipe.lora_dir = d
    prompt = "a red circle on a blue background"
    kw = dict(seed=3, steps=8, sampler="euler")
    base = pipe.txt2img(prompt, **kw)
    tagged = pipe.txt2img(prompt + " <lora:kohya:0.9>", **kw)
    explicit = pipe.txt2img(prompt, loras=[("kohya", 0.9)], **kw)
    after = pipe.txt2img(prompt, **kw)
    assert np.array_equal(tagged.pixels, explicit.pixels)
    assert np.abs(tagged.pixels.astype(int) - base.pixels).mean() > 2  # the LoRA changed the picture
    assert np.array_equal(after.pixels, base.pixels)  # and it is gone afterwards
    lora = pipe.load_lora("kohya")
    assert f'Lora hashes: "kohya: {lora.short_hash}"' in tagged.infotexts[0]
    assert tagged.infotexts[0].startswith(prompt + " <lora:kohya:0.9>")  # the tag stays in the recorded prompt
    assert "Lora hashes" not in after.infotexts[0]
    # the tag is not text: with the text-encoder weight at 0 the conditioning equals the plain prompt's
    clean, _ = apply_networks(pipe, [prompt + " <lora:kohya:0:1>"], None)
    assert clean == [prompt + " "]
    pipe.set_loras([])


def test_separate_text_encoder_and_unet_weights(pipe, files):
    d, pairs = files
    pipe.lora_dir = d
    te_key = next(k for k in pairs if k.startswith("cond_stage_model."))
    unet_keyname = next(k for k in pairs if k.startswith("model."))
    before = dict((k, v.detach().clone()) for k, v in pipe.model.named_parameters())
    apply_networks(pipe, ["x <lora:peft:0:1>"], None)
    params = dict(pipe.model.named_parameters())
    assert torch.equal(params[te_key], before[te_key]) and not torch.equal(params[unet_keyname], before[unet_keyname])
    pipe.set_loras([])


def test_bad_lora_files_and_tags_are_clear_errors(pipe, tmp_path):
    pipe.lora_dir = tmp_path
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(KilnError, match="LyCORIS hada"):
        pipe.load_lora("loha")
    save_file({"something.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KilnError, match="no LoRA weights found"):
        pipe.load_lora("plain")
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KilnError, match="matches this model's layers"):
        pipe.load_lora("other")
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "meta.safetensors"), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(KilnError, match="lora_adapter_metadata is not JSON"):
        pipe.load_lora("meta")
    with pytest.raises(KilnError, match="no LoRA named 'missing'"):
        pipe.txt2img("a <lora:missing:1>", steps=1)
    with pytest.raises(KilnError, match="weight must be a number"):
        pipe.txt2img("a <lora:other:lots>", steps=1)
    pipe.lora_dir = None
    with pytest.raises(KilnError, match="--lora-dir"):
        pipe.txt2img("a <lora:x:1>", steps=1)


def test_cli_lora_flags(files, tmp_path, capsys):
    from PIL import Image

    from kiln.cli import main

    d, _ = files
    out = tmp_path / "o"
    assert main(["txt2img", "--prompt", "a red circle <lora:kohya:0.5>", "--lora-dir", str(d), "--outdir", str(out),
                 "--n_samples", "1", "--ddim_steps", "4", "--skip_grid"]) == 0
    with Image.open(out / "samples" / "00000.png") as im:
        assert "Lora hashes: \"kohya: " in im.info["parameters"]
    assert main(["txt2img", "--prompt", "a", "--lora", f"{d / 'peft.safetensors'}:abc", "--outdir", str(out)]) == 1
    assert "--lora" in capsys.readouterr().err


def test_sdxl_peft_names_reach_unet_and_both_text_encoders(tmp_path):
    """An SDXL LoRA in diffusers/PEFT names (as Hyper-SDXL, LCM-LoRA SDXL and TCD-SDXL ship): UNet modules in
    diffusers' names, `text_encoder.` (CLIP ViT-L) and `text_encoder_2.` (bigG, whose q/k/v are thirds of one fused
    weight), alphas in diffusers' metadata header per part. Read against the SDXL layout's keys (no weights)."""
    import json

    import sdref
    from kiln.checkpoints.lora import read_lora
    from kiln.models import LatentDiffusion

    cfg = sdref.sdxl_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(cfg).state_dict().items()}
    nrb = cfg.unet.num_res_blocks
    ours = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    unet_name = unet_key(ours[len(UNET):], nrb)[:-len(".weight")]
    assert unet_name == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    g = torch.Generator().manual_seed(0)
    modules = {f"unet.{unet_name}": shapes[ours],
               "text_encoder.text_model.encoder.layers.3.self_attn.v_proj": (768, 768),
               "text_encoder_2.text_model.encoder.layers.5.self_attn.k_proj": (1280, 1280)}
    sd = {}
    for name, (o, i) in modules.items():
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = torch.randn(4, i, generator=g), torch.randn(o, 4)
    meta = {"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.r": 4,
            "text_encoder_2.lora_alpha": 1, "text_encoder_2.r": 4}
    save_file(sd, str(tmp_path / "xl.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lora = read_lora(tmp_path / "xl.safetensors", shapes.keys(), nrb)
    assert not lora.unmatched
    got = {p.key: (p.scale, p.rows) for p in lora.patches}
    clip_l, big_g = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.transformer."
    assert got == {ours: (2.0, None), clip_l + "encoder.layers.3.self_attn.v_proj.weight": (0.5, None),
                   big_g + "resblocks.5.attn.in_proj_weight": (0.25, (1280, 2560))}
