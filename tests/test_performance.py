"""Speed options change no result: channels-last weights (the CUDA default) and torch.compile give the same
latents as plain NCHW eager within float summation-order noise."""
import pytest
import torch

import kiln
import sdref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    sdref.save_tiny(path)
    return path


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


def test_compile_gives_the_same_latents_and_sees_lora_changes(tiny, tmp_path):
    from safetensors.torch import save_file

    eager = kiln.load(tiny, device="cpu")
    comp = kiln.load(tiny, device="cpu")
    comp.compile()  # CPU: inductor freezing on (weights become constants)
    a, b = run(eager), run(comp)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    # A LoRA merged after compiling must reach the frozen graph (the compiled code is reset).
    key = next(k for k, _ in comp.model.named_parameters() if k.endswith("attn2.to_k.weight"))
    out, inp = dict(comp.model.named_parameters())[key].shape
    name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
    g = torch.Generator().manual_seed(0)
    save_file({f"{name}.lora_down.weight": torch.randn(4, inp, generator=g), f"{name}.lora_up.weight":
               torch.randn(out, 4, generator=g), f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "l.safetensors"))
    lora = [(str(tmp_path / "l.safetensors"), 1.0)]
    a2, b2 = run(eager, lora), run(comp, lora)
    assert (a2 - a).abs().max() > 1e-2 * a.abs().max()  # the LoRA changes the result
    assert (a2 - b2).abs().max() <= 1e-4 * a2.abs().max()
