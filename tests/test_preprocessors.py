"""The weight-free ControlNet preprocessors (kiln/preprocessors.py) against sd-webui-controlnet's behaviour; OpenCV,
when installed, is the oracle for Canny and the resize kernels (it is not a kiln dependency)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kiln import preprocessors as pp
from kiln.errors import KilnError


def square(value: int = 255, size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    a = np.zeros((size, size, 3), np.uint8)
    a[lo:hi, lo:hi] = value
    return a


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A disc, a rectangle, a ramp and noise: edges in every direction, of every strength."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    a = np.zeros((h, w, 3), np.float64)
    a[(xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2] = (200, 60, 30)
    a[h // 5:h // 2, w // 2:w - 10] = (30, 180, 90)
    a += (xx * 0.3)[..., None] + rng.normal(0, 8, (h, w, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def test_canny_square_edges_lie_on_its_border_one_pixel_wide():
    edges = np.asarray(pp.run("canny", square(), res=64))  # 64 px at res 64: no resize, no padding
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    e = edges[:, :, 0] > 0
    assert (edges[:, :, 0] == edges[:, :, 2]).all()
    # OpenCV's suppression keeps the outer pixel on the left/top (ties go to it) and the inner one on the
    # right/bottom: the edge is the ring of rows/columns 15 and 47.
    assert e[15, 18:45].all() and e[47, 18:45].all() and e[18:45, 15].all() and e[18:45, 47].all()
    inside = e[16:47, 16:47].copy()
    inside[[0, 0, -1, -1], [0, -1, 0, -1]] = False  # the corners are cut diagonally, one pixel in
    assert not inside.any(), "nothing inside the square"
    outside = np.ones_like(e)
    outside[15:48, 15:48] = False
    assert not e[outside].any(), "nothing outside the ring"
    assert (e[:, 18:45].sum(axis=0) == 2).all() and (e[18:45, :].sum(axis=1) == 2).all(), "one pixel wide"


def stripe(value: int) -> np.ndarray:
    """A full-height vertical band of `value` on black: two straight edges, no corners."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 16:48] = value
    return a


def test_canny_thresholds_decide_what_survives():
    # A band of 40: |gx| + |gy| = 4 * 40 = 160 across its sides.
    assert np.asarray(pp.run("canny", stripe(40), 64, 100, 200)).max() == 0, "160 is under the high threshold"
    e = np.asarray(pp.run("canny", stripe(40), 64, 100, 150))[:, :, 0] > 0
    assert e[:, 15].all() and e[:, 47].all() and e.sum() == 128
    assert np.asarray(pp.run("canny", stripe(40), 64, 170, 150)).max() == 0, "swapped thresholds are reordered"
    # Hysteresis: weak edge pixels survive only when connected to a strong one.
    linked = stripe(40)
    linked[:8, 16:48] = 255  # the band's top is bright: strong edges that continue into the weak ones
    e = np.asarray(pp.run("canny", linked, 64, 100, 200))[:, :, 0] > 0
    assert e[12:, 15].all() and e[12:, 47].all(), "the weak sides (below the bright top) are kept through it"
    apart = stripe(40)
    apart[28:36, 2:8] = 255  # a strong blob that does not touch the band
    e = np.asarray(pp.run("canny", apart, 64, 100, 200))[:, :, 0] > 0
    assert e[:, :12].any() and not e[:, 12:].any()


def test_canny_runs_at_the_processor_resolution_and_crops_the_padding():
    out = pp.run("canny", scene(60, 100), res=128)  # short side 60 -> 128: 213 x 128, padded to 256 x 128
    assert out.size == (213, 128)


def test_canny_and_resize_agree_with_opencv():
    cv2 = pytest.importorskip("cv2")
    same = total = 0
    for h, w in [(64, 64), (96, 130)]:
        for low, high in [(100, 200), (20, 60), (50, 100)]:
            for img in (scene(h, w), scene(h, w)[:, :, 1].copy(),
                        np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)):
                ref = cv2.Canny(img, low, high)
                same += int((pp.canny(img, low, high) == ref).sum())
                total += ref.size
    assert same / total >= 0.999, f"Canny agreement {100 * same / total:.3f}%"
    img = scene(90, 137)
    for interp, flag, size in [("area", cv2.INTER_AREA, (61, 40)), ("nearest", cv2.INTER_NEAREST, (200, 131)),
                               ("cubic", cv2.INTER_CUBIC, (200, 131)), ("cubic", cv2.INTER_CUBIC, (50, 33))]:
        diff = np.abs(pp.resize_array(img, *size, interp).astype(int) - cv2.resize(img, size, interpolation=flag))
        assert diff.max() <= (1 if interp == "cubic" else 0), interp  # cubic: OpenCV's 11-bit fixed point


def test_none_invert_threshold_tile_resample():
    a = scene(40, 50)
    assert (np.asarray(pp.run("none", a)) == a).all()
    assert (np.asarray(pp.run("invert (from white bg & black line)", a)) == 255 - a).all()
    assert (np.asarray(pp.run("Invert", Image.fromarray(a[:, :, 0]))) == 255 - a[:, :, :1]).all(), "grey -> RGB"
    px = np.array([[[200, 200, 200], [200, 100, 200], [128, 128, 128], [127, 255, 255]]], np.uint8)
    px = np.repeat(np.repeat(px, 64, axis=0), 16, axis=1)  # 64 x 64: res 64 keeps it as is
    t = np.asarray(pp.run("threshold", px, 64))[0, ::16, 0]
    assert t.tolist() == [255, 0, 255, 0], "white only where the darkest channel is above 127"
    assert np.asarray(pp.run("threshold", px, 64, threshold_a=99))[0, ::16, 0].tolist() == [255, 255, 255, 255]
    assert pp.run("tile_resample", a, threshold_a=1.05).size == (50, 40), "rates under 1.1 keep the image"
    assert pp.run("tile_resample", a, threshold_a=2.5).size == (20, 16)


def test_thresholds_default_validate_and_refuse():
    a = square(40)
    assert pp.run("canny", a, 64, -1, -1) == pp.run("canny", a, 64)  # -1: sd-webui-controlnet's "unset"
    with pytest.raises(KilnError, match="threshold_a: Low Threshold of canny must be in 0..256"):
        pp.run("canny", a, 64, 300)
    with pytest.raises(KilnError, match="threshold_b: the threshold preprocessor takes no threshold_b"):
        pp.run("threshold", a, 64, 100, 5)
    with pytest.raises(KilnError, match="processor_res"):
        pp.run("canny", a, 8)


@pytest.mark.parametrize("name", ["openpose", "depth_midas", "depth", "softedge_hed", "lineart", "mlsd",
                                  "normal_bae", "seg_ofade20k", "scribble_pidinet", "inpaint_only+lama"])
def test_preprocessors_with_weights_are_refused_in_one_line(name):
    with pytest.raises(KilnError) as e:
        pp.run(name, square())
    assert "weights kiln does not have" in str(e.value) and "\n" not in str(e.value)


def test_unknown_and_unimplemented_are_refused():
    with pytest.raises(KilnError, match="unknown ControlNet preprocessor 'cany'; available: none, canny"):
        pp.find("cany")
    with pytest.raises(KilnError, match="'scribble_xdog' is not implemented in kiln"):
        pp.find("scribble_xdog")


def test_aliases():
    assert pp.find("Canny").name == pp.find("canny").name == "canny"
    assert pp.find("inpaint_global_harmonious").name == "inpaint"
    assert pp.find(None).name == pp.find("").name == "none"


def test_resize_modes_sizes_and_content():
    a = np.zeros((50, 100, 3), np.uint8)
    a[:, :25] = 255  # a white left quarter
    for mode in (0, 1, 2, 3, "Just Resize", "crop and resize", "Resize and Fill", "Inner Fit (Scale to Fit)"):
        assert pp.resize_for(a, 64, 48, mode).size == (64, 48)
    assert pp.resize_mode(1) == pp.resize_mode("Inner Fit (Scale to Fit)") == "Crop and Resize"
    assert pp.resize_mode(3) == "Just Resize" and pp.resize_mode("resize-and-fill") == "Resize and Fill"
    crop = np.asarray(pp.resize_for(a, 64, 64, "Crop and Resize"))  # 128 x 64 -> centre 64: cols 32..95
    assert crop[:, :, 0].max() == 0, "the white quarter (0..31 at this scale) is cropped away"
    fill = np.asarray(pp.resize_for(a, 64, 64, "Resize and Fill"))  # 64 x 32 in the middle rows 16..47
    assert fill[16:48, :16].min() == 255 and fill[16:48, 16:].max() == 0
    assert fill[:16].max() == 0 and fill[48:].max() == 0, "borders take the edge pixels' median (black)"
    stretch = np.asarray(pp.resize_for(a, 64, 64, "Just Resize"))
    assert stretch[:, :16].min() == 255 and stretch[:, 16:].max() == 0, "black and white stays black and white"
    for bad in (4, "stretch", True):
        with pytest.raises(KilnError, match="resize_mode must be one of"):
            pp.resize_mode(bad)


def test_resize_and_fill_marks_the_fill_as_masked_for_inpaint():
    rgba = np.zeros((32, 64, 4), np.uint8)
    out = np.asarray(pp.resize_for(Image.fromarray(rgba, "RGBA"), 64, 64, "Resize and Fill"))
    assert out.shape == (64, 64, 4)
    assert out[:16, :, 3].min() == 255 and out[16:48, :, 3].max() == 0 and out[48:, :, 3].min() == 255


@pytest.mark.parametrize("image, target, mode, expected", [
    ((512, 512), (512, 512), "Crop and Resize", 512),
    ((1024, 768), (512, 512), "Crop and Resize", 512),   # max(512/768, 512/1024) * 768
    ((1024, 768), (512, 512), "Resize and Fill", 384),   # min(...) * 768
    ((640, 480), (1024, 768), 0, 768),
    ((100, 60), (512, 512), 2, 307),                      # 5.12 * 60 = 307.2
    ((300, 200), (512, 768), "Just Resize", 768),         # max(768/200, 512/300) * 200
])
def test_pixel_perfect_resolution(image, target, mode, expected):
    w, h = target
    assert pp.pixel_perfect_resolution(image, w, h, mode) == expected


def test_inpaint_hint_sets_masked_pixels_to_minus_one():
    img = np.full((8, 8, 3), 51, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    mask[0, 3] = 127  # under half: kept
    hint = pp.inpaint_hint(img, Image.fromarray(mask))
    assert hint.dtype == np.float32 and hint.shape == (8, 8, 3)
    assert (hint[:, 4:] == -1).all() and np.allclose(hint[:, :4], 0.2)
    assert (np.asarray(pp.run("inpaint_only", img)) == img).all(), "inpaint modules pass the image through"
    with pytest.raises(KilnError, match="inpaint mask is 4x8"):
        pp.inpaint_hint(img, np.zeros((8, 4), np.uint8))


def test_module_list_shape():
    listing = pp.module_list()
    assert listing["module_list"] == ["none", "tile_resample", "inpaint_only", "canny", "invert", "threshold",
                                      "inpaint"]
    detail = listing["module_detail"]
    assert set(detail) == set(listing["module_list"])
    assert all(set(d) == {"model_free", "sliders"} and d["model_free"] is False for d in detail.values())
    assert detail["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 128, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 0, "max": 256, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 0, "max": 256, "step": 1}]
    assert detail["invert"]["sliders"] == [] and detail["inpaint"]["sliders"] == []
    assert detail["tile_resample"]["sliders"][1]["name"] == "Down Sampling Rate"
