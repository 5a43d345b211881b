"""Model upscalers around the networks: tiled inference (kiln/pipeline/upscale.py), the registry by name
(kiln/pipeline/upscalers.py), A1111's extras step, `kiln upscale`, hires fix with a model upscaler, and the API
(/sdapi/v1/upscalers, /realesrgan-models, extras, hr_upscaler). The files are random-weight ESRGANs in BasicSR's
names (the networks themselves are checked against spandrel in test_upscaler_models.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kiln.errors import KilnError
from kiln.models.upscalers.esrgan import RRDBNet
from kiln.pipeline.upscale import ramps, spans, upscale_pixels
from kiln.pipeline.upscalers import Upscalers


def esrgan_state(nf=16, nb=2, upsamples=2, seed=0) -> dict:
    """Random He-style weights of a small RRDBNet (16 features, 2 blocks, 4x) under BasicSR's names."""
    net = RRDBNet(nf=nf, nb=nb, upsamples=upsamples)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        out[k] = noise * math.sqrt(2.0 / math.prod(v.shape[1:])) if v.dim() >= 2 else noise * 0.05
    out["conv_last.weight"] *= 0.05  # most output values inside [0, 1], around 0.5 (a random trunk saturates)
    out["conv_last.bias"] += 0.5
    return out


def write_esrgan(path, **kw):
    state = esrgan_state(**kw)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"params_ema": state}, path)
    return path


def picture(w=72, h=60, seed=0) -> np.ndarray:
    """A smooth random picture (upscaled noise): [h, w, 3] uint8."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def esrgan():
    from kiln.checkpoints.upscaler import load_upscaler
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        yield load_upscaler(write_esrgan(Path(d) / "4x-test.safetensors"))


# ------------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("length, tile, overlap", [(72, 40, 12), (100, 32, 8), (33, 32, 8), (20, 32, 8),
                                                   (513, 512, 32)])
def test_spans_cover_and_weights_sum_to_one(length, tile, overlap):
    sides = spans(length, tile, overlap)
    assert sides[0][0] == 0 and sides[-1][1] == length and all(b - a <= max(tile, length * (tile <= 0))
                                                                 for a, b in sides)
    assert all(a1 < a2 and b1 - a2 >= overlap for (a1, b1), (a2, _) in zip(sides, sides[1:]))
    total = torch.zeros(length * 4)
    for (a, b), w in zip(sides, ramps(sides, length, 4, overlap)):
        assert (w >= 0).all()
        total[a * 4:b * 4] += w
    assert torch.allclose(total, torch.ones_like(total))


def test_tiled_matches_untiled_and_stays_within_the_tile(esrgan):
    """Tiled within 1/255 of the whole picture on >= 99% of values; the network never sees more than a tile."""
    seen = []
    hook = esrgan.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    try:
        x = picture()
        whole = upscale_pixels(esrgan, x, tile=0)
        seen.clear()
        tiled = upscale_pixels(esrgan, x, tile=40, overlap=12)
    finally:
        hook.remove()
    assert whole.shape == tiled.shape == (240, 288, 3) and whole.std() > 10  # not a flat picture
    assert ((whole == 0) | (whole == 255)).mean() < 0.01  # nor a clipped one
    close = (np.abs(whole.astype(int) - tiled.astype(int)) <= 1).mean()
    assert close >= 0.99, f"only {close:.3%} of values within 1/255"
    assert len(seen) == 6  # 3 x 2 tiles
    assert max(math.prod(i[-2:]) for i, _ in seen) <= 40 * 40
    assert max(math.prod(o) for _, o in seen) <= 3 * (40 * 4) ** 2  # the largest tensor a tile makes


class Nearest(torch.nn.Module):
    """A 3x 'network' with no context (nearest upsampling): tiled, it must give exactly the untiled result."""
    scale, name = 3, "nearest"

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))

    @property
    def dtype(self):
        return self.one.dtype

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=3, mode="nearest") * self.one


def test_many_tile_rows_are_blended_exactly():
    x = np.random.default_rng(2).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    out = upscale_pixels(Nearest(), x, tile=40, overlap=12)  # 5 x 6 tiles
    assert np.array_equal(out, x.repeat(3, 0).repeat(3, 1))


def test_a_plain_crossfade_shows_the_seams(esrgan, monkeypatch):
    """Why the weights skip the margin next to a tile's edge: a linear crossfade over the whole overlap lets the
    padding's effect through (docs/upscalers.md, Seams)."""
    import kiln.pipeline.upscale as upscale

    x = picture()
    whole = upscale_pixels(esrgan, x, tile=0)
    monkeypatch.setattr(upscale, "MARGIN", 0.0)
    plain = upscale_pixels(esrgan, x, tile=40, overlap=12)
    assert (np.abs(whole.astype(int) - plain.astype(int)) <= 1).mean() < 0.99


def test_overlap_must_leave_a_tile(esrgan):
    with pytest.raises(ValueError, match="under half the tile"):
        upscale_pixels(esrgan, picture(), tile=32, overlap=16)


# ------------------------------------------------------------------------------------------------ registry
@pytest.fixture()
def folders(tmp_path):
    """models/ESRGAN and models/RealESRGAN as A1111 has them, and an --upscaler-dir."""
    root = tmp_path / "models"
    (root / "ESRGAN").mkdir(parents=True)
    (root / "RealESRGAN").mkdir()
    own = tmp_path / "mine"
    own.mkdir()
    write_esrgan(root / "ESRGAN" / "4x-UltraSharp.pth")
    write_esrgan(root / "RealESRGAN" / "RealESRGAN_x4plus.safetensors", seed=1)
    write_esrgan(own / "2x_Mine.safetensors", seed=2, upsamples=1)
    (own / "notes.txt").write_text("not a model")
    return root, own


def test_registry_names_and_lookups(folders):
    root, own = folders
    ups = Upscalers(own, models_root=root, device="cpu")
    assert ups.names() == ["None", "Lanczos", "Nearest", "2x_Mine", "4x-UltraSharp", "R-ESRGAN 4x+"]
    assert [(m.kind, m.scale) for m in ups.models()] == [("ESRGAN", 2), ("ESRGAN", 4), ("RealESRGAN", 4)]
    assert ups.canonical("4x-ultrasharp") == "4x-UltraSharp" and ups.canonical("RealESRGAN_x4plus") == "R-ESRGAN 4x+"
    assert ups.canonical("lanczos") == "Lanczos"
    path = str(root / "ESRGAN" / "4x-UltraSharp.pth")
    assert ups.find(path).name == "4x-UltraSharp" and ups.canonical(path) == path
    with pytest.raises(KilnError, match=r"upscaler 'nope' is not available; choose one of None, Lanczos, Nearest, "
                                        r"2x_Mine, 4x-UltraSharp, R-ESRGAN 4x\+ or the path"):
        ups.find("nope")
    with pytest.raises(KilnError, match="is not available"):
        ups.find(path, paths=False)  # a server never opens a path a request names


def test_registry_loads_once_and_upscales_to_the_size(folders):
    root, own = folders
    ups = Upscalers(own, models_root=root, device="cpu")
    m = ups.find("2x_Mine")
    assert ups.load(m) is ups.load(m)
    assert ups.load(m).conv_first.weight.is_contiguous(memory_format=torch.channels_last)  # convolutions: NHWC
    src = Image.fromarray(picture(24, 20))
    # a 2x model run twice to reach 3x (as A1111), then Lanczos down to the size asked
    assert ups.upscale(src, 72, 60, "2x_Mine").size == (72, 60)
    assert ups.upscale(src, 40, 30, "Nearest").size == (40, 30)


def test_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a pickle")
    ups = Upscalers(tmp_path, models_root=tmp_path / "none", device="cpu")
    with pytest.raises(KilnError) as e:
        ups.upscale(Image.new("RGB", (8, 8)), 32, 32, "broken")
    assert "broken.pth" in str(e.value) and "\n" not in str(e.value)
