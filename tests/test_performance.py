"""Speed options change no result: channels-last weights (the CUDA default) and torch.compile give the same
latents as plain NCHW eager within float summation-order noise."""
import pytest
import torch

import kiln
from kiln.errors import KilnError
import sdref


def run(pipe, loras=None):
    return pipe.txt2img("a red circle", steps=3, sampler="euler", width=64, height=64, seed=5, batch_size=2,
                        loras=loras).latents


def test_channels_last_changes_nothing(tiny):
    fast = kiln.load(tiny, device="cpu", channels_last=True)
    plain = kiln.load(tiny, device="cpu")  # the CPU default: NCHW, weights stay memory-mapped
    w = fast.model.unet.input_blocks[1][0].in_layers[2].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert plain.model.unet.input_blocks[1][0].in_layers[2].weight.is_contiguous()
    a, b = run(fast), run(plain)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()  # relative: these latents reach ±30
    # images decode the same too
    assert torch.allclose(fast.decode_latents(a), plain.decode_latents(a), atol=1e-5)


def test_compile_gives_the_same_latents_and_sees_lora_changes(tiny, cross_attention_lora):
    eager = kiln.load(tiny, device="cpu")
    comp = kiln.load(tiny, device="cpu")
    comp.compile()  # CPU: inductor freezing on (weights become constants)
    a, b = run(eager), run(comp)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    # A LoRA merged after compiling must reach the frozen graph (the compiled code is reset).
    lora = cross_attention_lora(comp.model)
    a2, b2 = run(eager, lora), run(comp, lora)
    assert (a2 - a).abs().max() > 1e-2 * a.abs().max()  # the LoRA changes the result
    assert (a2 - b2).abs().max() <= 1e-4 * a2.abs().max()


def test_prepacked_convolutions_change_nothing(tiny, tmp_path):
    packed = kiln.load(tiny, device="cpu")  # the CPU default, "auto": an fp32 file's weights are memory-mapped
    plain = kiln.load(tiny, device="cpu", prepack=False)
    a, b = run(packed), run(plain)
    conv = lambda p: p.model.unet.input_blocks[1][0].in_layers[2]
    assert conv(packed)._packed is not None and getattr(conv(plain), "_packed", None) is None
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    # fp16 file computed in fp32: converted weights are ordinary memory; "auto" leaves them, True packs them
    sdref.save_tiny(tmp_path / "half.safetensors", dtype=torch.float16)
    auto = kiln.load(tmp_path / "half.safetensors", device="cpu")
    forced = kiln.load(tmp_path / "half.safetensors", device="cpu", prepack=True)
    c, d = run(auto), run(forced)
    assert getattr(conv(auto), "_packed", None) is None and conv(forced)._packed is not None
    assert (c - d).abs().max() <= 1e-4 * c.abs().max()


# ---------------------------------------------------------------- --medvram / --lowvram

def _placement(parts):
    return [{t.device.type for t in (*p.parameters(), *p.buffers())} for p in parts]


@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_offload_moves_one_part_at_a_time_and_back_without_copies(tmp_path, mode):
    """The "device" is `meta` here (no GPU): a part's tensors are on it exactly while that part runs, and sending
    a part back re-attaches the very CPU tensors it had (no copy, values untouched)."""
    from test_sdxl import write_tiny_sdxl  # SDXL: two text encoders, `hidden_and_pooled`, label_emb
    from kiln.offload import offload, unet_blocks

    pipe = kiln.load(write_tiny_sdxl(tmp_path / "xl.safetensors"), device="cpu")
    model = pipe.model
    before = {k: (t.data_ptr(), t.clone()) for k, t in model.state_dict().items()}
    off = offload(model, "meta", mode)
    parts = off.parts
    assert len(parts) == len(model.text_models) + (len(unet_blocks(model.unet)) if mode == "lowvram" else 1) + 2
    seen = []

    def check(module, args, part):  # registered after the offloader's hooks, so it runs after `bring`
        seen.append(part)
        placed = _placement(parts)
        assert all(pl == ({"meta"} if p is part else {"cpu"}) for p, pl in zip(parts, placed))

    for part in parts:
        for m in part.modules():
            m.register_forward_pre_hook(lambda m, a, part=part: check(m, a, part))
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    model.text_models[0](ids)
    model.text_models[1].hidden_and_pooled(ids, 1, False)  # not `forward`: the submodules' hooks bring it
    unet = model.unet
    unet(torch.zeros(2, 4, 8, 8, device="meta"), torch.zeros(2, device="meta"),
         torch.zeros(2, 77, unet.cfg.context_dim, device="meta"),
         torch.zeros(2, unet.cfg.adm_in_channels, device="meta"))
    model.vae.decode(torch.zeros(1, 4, 8, 8, device="meta"))
    unet_parts = unet_blocks(unet) if mode == "lowvram" else [unet]
    assert off.loads == 2 + len(unet_parts) + 1
    assert [p for p in dict.fromkeys(seen)] == [*model.text_models, *unet_parts, model.vae.decoder]
    off.send_back(off.resident)
    assert all(pl == {"cpu"} for pl in _placement(parts))
    after = model.state_dict()
    for k, (ptr, value) in before.items():
        if any(k.startswith(p) for p in ("first_stage_model.quant_conv", "first_stage_model.post_quant_conv")):
            assert after[k].device.type == "meta"  # small, outside every part: stays on the device
            continue
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k


def test_offloaded_pipeline_gives_the_same_latents(tiny):
    plain = kiln.load(tiny, device="cpu")
    off = kiln.load(tiny, device="cpu")
    off.offload("lowvram")  # on a CPU the moves are no-ops; the hooks and hand-overs still run
    assert off.offloader.parts
    a, b = run(plain), run(off)
    assert torch.equal(a, b)
    assert off.offloader.loads > len(off.offloader.parts)  # parts came and went, step after step
    with pytest.raises(KilnError, match="do not go together"):
        off.compile()
    off.offload(None)
    assert off.offloader is None and torch.equal(run(off), a)


def test_offload_flags_on_a_cpu_are_ignored_with_a_notice(tiny):
    pipe = kiln.load(tiny, device="cpu", offload="lowvram")
    assert pipe.offloader is None
    assert any("nothing to offload" in n for n in pipe.notices)


def test_attention_slicing_changes_nothing(tiny, monkeypatch):
    from kiln.models.unet import CrossAttention

    calls = []
    attend = CrossAttention.attend
    monkeypatch.setattr(CrossAttention, "attend",
                        lambda self, q, k, v: calls.append(q.shape[2]) or attend(self, q, k, v))
    pipe = kiln.load(tiny, device="cpu")
    a = run(pipe)
    whole = list(calls)
    calls.clear()
    pipe.attention_slicing(7)  # 64x64 → 16x16 latents, attention at 8x8: 64 queries in slices of 7 (the last one 1)
    b = run(pipe)
    assert set(whole) == {64} and set(calls) == {7, 1} and len(calls) == 10 * len(whole)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    with pytest.raises(KilnError, match="at least 1"):
        pipe.attention_slicing(0)


# ---------------------------------------------------------------- DeepCache-style feature reuse

def test_feature_cache_reuses_the_deep_feature_and_runs_the_whole_unet_every_interval(tiny):
    from kiln.models.unet import FeatureCache

    pipe = kiln.load(tiny, device="cpu")
    unet = pipe.model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    x2 = x + 0.2 * torch.randn(2, 4, 16, 16, generator=g)  # the next step's input
    t1, t2 = torch.tensor([600.0, 600.0]), torch.tensor([500.0, 500.0])
    deep = []
    unet.middle_block.register_forward_pre_hook(lambda m, a: deep.append(1))
    with torch.no_grad():
        plain1, plain2 = unet(x, t1, ctx), unet(x2, t2, ctx)
        cache = FeatureCache(interval=3, depth=2)
        full = unet(x, t1, ctx, cache=cache)
        same = unet(x, t1, ctx, cache=cache)  # reused, but nothing changed: exactly the whole UNet's answer
        unet(x2, t2, ctx, cache=cache)
        unet(x2, t2, ctx, cache=cache)  # the 4th call runs everything again
        assert torch.equal(full, plain1) and torch.equal(same, plain1)
        assert len(deep) == 2 + 2  # two plain calls, then calls 1 and 4 of the cached run
        errors = []
        for depth in (1, 3):  # the outer blocks see the new input; more of them, closer to the whole UNet
            cache = FeatureCache(interval=2, depth=depth)
            unet(x, t1, ctx, cache=cache)
            errors.append((unet(x2, t2, ctx, cache=cache) - plain2).abs().mean().item())
    stale = (plain1 - plain2).abs().mean().item()
    assert errors[1] < errors[0] < stale, (errors, stale)  # measured 0.209 < 0.228 < 0.242


def test_deepcache_in_the_pipeline(tiny):
    pipe = kiln.load(tiny, device="cpu")
    a = pipe.txt2img("a red circle", steps=6, sampler="ddim", width=64, height=64, seed=5)
    pipe.set_deepcache(2, depth=2)
    b = pipe.txt2img("a red circle", steps=6, sampler="ddim", width=64, height=64, seed=5)
    assert "DeepCache interval: 2, DeepCache depth: 2" in b.infotexts[0] and "DeepCache" not in a.infotexts[0]
    diff = (a.latents - b.latents).abs()
    assert 0 < diff.mean() < 0.5 * a.latents.abs().mean()  # a nearby picture, not the same one
    pipe.set_deepcache(None)
    assert torch.equal(pipe.txt2img("a red circle", steps=6, sampler="ddim", width=64, height=64, seed=5).latents,
                       a.latents)
    with pytest.raises(KilnError, match="depth"):
        pipe.set_deepcache(2, depth=len(pipe.model.unet.input_blocks))
    with pytest.raises(KilnError, match="interval"):
        pipe.set_deepcache(0)
