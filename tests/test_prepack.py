"""oneDNN weight pre-packing of `kiln.models.conv.Conv2d` and `Linear` (the CPU inference default)."""
import copy
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.models.conv import _MKLDNN, Conv2d, Linear, file_backed, prepack, release_pages

needs_mkldnn = pytest.mark.skipif(not _MKLDNN, reason="this torch build has no oneDNN")


def make_conv(cin, cout, k, stride=1, padding=0, seed=0):
    torch.manual_seed(seed)
    conv = Conv2d(cin, cout, k, stride=stride, padding=padding).eval().requires_grad_(False)
    conv.prepack = True  # "auto" would leave these freshly made (not file-backed) weights alone
    with torch.no_grad():
        conv.weight.normal_(0, 1 / (cin * k * k) ** 0.5)
        conv.bias.normal_(0, 0.1)
    return conv


def close(a, b):
    """Equal up to float summation order: max |Δ| ≤ 1e-5 relative to the output's scale."""
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def reference(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@needs_mkldnn
@pytest.mark.parametrize("cin,cout,k,stride,padding,hw", [
    (64, 64, 3, 1, 1, 8), (32, 96, 3, 2, 1, 16), (48, 16, 1, 1, 0, 12), (16, 32, 3, 2, 0, 9), (4, 32, 3, 1, 1, 7)])
def test_packed_convolution_equals_pytorch(cin, cout, k, stride, padding, hw):
    conv = make_conv(cin, cout, k, stride, padding)
    x = torch.randn(2, cin, hw, hw)
    with torch.inference_mode():
        out = conv(x)
    assert conv._packed_key is not None and conv._packed.is_mkldnn  # the packed path ran
    ref = reference(conv, x)
    assert close(out, ref)


@needs_mkldnn
def test_repacks_for_a_new_shape_and_for_a_changed_weight():
    conv = make_conv(32, 32, 3, padding=1)
    with torch.no_grad():
        a = torch.randn(2, 32, 8, 8)
        conv(a)
        first = conv._packed_key
        b = torch.randn(1, 32, 12, 10)
        assert close(conv(b), reference(conv, b))
        assert conv._packed_key != first
        conv.weight.add_(0.5)  # what a LoRA merge does
        out = conv(b)
    assert close(out, reference(conv, b))
    assert (out - F.conv2d(b, conv.weight - 0.5, conv.bias, padding=1)).abs().max().item() > 0.1


@needs_mkldnn
def test_pytorch_path_for_training_circular_padding_other_dtypes_and_when_off():
    conv = make_conv(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 8, 8)
    conv.requires_grad_(True)
    conv(x).sum().backward()  # gradients need PyTorch's convolution
    assert getattr(conv, "_packed_key", None) is None and conv.weight.grad is not None
    conv.requires_grad_(False)
    conv.padding_mode = "circular"
    with torch.no_grad():
        out = conv(x)
    assert getattr(conv, "_packed_key", None) is None
    assert (out - F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias)).abs().max() < 1e-5
    conv.padding_mode = "zeros"
    double = copy.deepcopy(conv).to(torch.float64)
    with torch.no_grad():
        double(x.double())
    assert getattr(double, "_packed_key", None) is None
    half = copy.deepcopy(conv).to(torch.bfloat16)  # bf16 packs, even under "auto" (not file-backed)
    half.prepack = "auto"
    with torch.no_grad():
        out = half(x.bfloat16())
    assert half._packed_key is not None and out.dtype == torch.bfloat16
    assert torch.equal(out, F.conv2d(x.bfloat16(), half.weight, half.bias, padding=1))
    prepack(conv, False)
    with torch.no_grad():
        conv(x)
    assert getattr(conv, "_packed_key", None) is None
    prepack(conv, True)
    with torch.no_grad():
        conv(x)
    assert conv._packed_key is not None


@needs_mkldnn
def test_copies_and_pickles_leave_the_packed_weight_behind():
    conv = make_conv(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        want = conv(x)
        for other in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
            assert getattr(other, "_packed", None) is None
            assert torch.equal(other.weight, conv.weight)
            assert (other(x) - want).abs().max().item() < 1e-6


@needs_mkldnn
@pytest.mark.parametrize("shape,cin,cout,bias", [((2, 1024, 320), 320, 320, False), ((2, 77, 768), 768, 320, False),
                                                  ((128, 1280), 1280, 5120, True), ((2, 16, 8, 64), 64, 48, True)])
def test_packed_linear_equals_pytorch_and_repacks(shape, cin, cout, bias):
    torch.manual_seed(0)
    lin = Linear(cin, cout, bias=bias).eval().requires_grad_(False)
    lin.prepack = True
    x = torch.randn(shape)
    with torch.inference_mode():
        out = lin(x)
        assert lin._packed_key is not None and lin._packed.is_mkldnn  # the packed path ran
        assert close(out, F.linear(x, lin.weight, lin.bias))
        y = x[:1]  # fewer rows: the layout oneDNN picks depends on them
        assert close(lin(y), F.linear(y, lin.weight, lin.bias)) and lin._packed_key[0] == (y.numel() // cin,)
    with torch.no_grad():
        lin.weight.mul_(-1)  # what a LoRA merge does
        out = lin(x)
    assert close(out, F.linear(x, lin.weight, lin.bias))
    assert (out - F.linear(x, -lin.weight, lin.bias)).abs().max().item() > 0.1


@needs_mkldnn
def test_linear_takes_pytorch_path_for_training_and_when_off():
    lin = Linear(32, 16).eval()
    lin.prepack = True
    x = torch.randn(4, 32)
    lin(x).sum().backward()
    assert getattr(lin, "_packed_key", None) is None and lin.weight.grad is not None
    prepack(lin, False)
    with torch.no_grad():
        lin.requires_grad_(False)(x)
    assert getattr(lin, "_packed_key", None) is None


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_PAGEOUT is Linux's")
def test_release_pages_drops_file_pages_and_keeps_every_value(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(32 * 1024 * 1024, dtype=torch.float32).reshape(32, 1024, 1024)}, str(path))
    f = safe_open(str(path), framework="pt")
    t = f.get_tensor("w")  # memory-mapped, as kiln's loader keeps the weights
    total = t.sum(dtype=torch.float64).item()  # touches all 128 MB
    before = _rss_kb()
    release_pages(t)
    after = _rss_kb()
    assert before - after > 100 * 1024, (before, after)  # ≥ 100 of the 128 MB left the resident set
    assert t.sum(dtype=torch.float64).item() == total  # re-read from the file, unchanged
    anon = torch.ones(16 * 1024 * 1024)  # ordinary memory: nothing to re-read it from, so it must stay
    anon[::1024] = 2
    release_pages(anon)
    assert anon.sum().item() == 16 * 1024 * 1024 + 16 * 1024


@needs_mkldnn
@pytest.mark.skipif(sys.platform != "linux", reason="file-backed memory is told from /proc/self/maps")
def test_auto_packs_only_weights_mapped_from_a_file(tmp_path):
    conv = make_conv(16, 16, 3, padding=1)
    conv.prepack = "auto"
    path = tmp_path / "c.safetensors"
    save_file({"w": conv.weight.detach().clone()}, str(path))
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        conv(x)
        assert not file_backed(conv.weight) and getattr(conv, "_packed_key", None) is None  # ordinary memory
        mapped = safe_open(str(path), framework="pt").get_tensor("w")
        assert file_backed(mapped)
        conv.weight = torch.nn.Parameter(mapped, requires_grad=False)
        out = conv(x)
    assert conv._packed_key is not None and close(out, reference(conv, x))
    with pytest.raises(ValueError):
        prepack(conv, "sometimes")
