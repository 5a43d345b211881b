"""ControlNet preprocessors that need no weights, as sd-webui-controlnet (Mikubill/sd-webui-controlnet) names and
runs them: none, invert, canny, threshold, tile_resample, inpaint, inpaint_only. Plus the control image's fit to the
generation size (its three resize modes), "pixel perfect" and the processor resolution, and the module list its
`/controlnet/module_list` returns. Preprocessors that run a network (openpose, depth, lineart, ...) are named and
refused in one line.

numpy and PIL only: OpenCV's Canny and resize kernels are re-implemented here (see `canny`, `_weights`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import KilnError

# ---------------------------------------------------------------------------------------------------------- resizing
# OpenCV's resize, one axis at a time: INTER_AREA (area coverage) and INTER_NEAREST (floor(i * in/out)) as dense
# (out, in) weight matrices, exact; INTER_CUBIC (a = -0.75, replicated borders) as four taps in float: OpenCV works in
# 8-bit fixed point there, so about 1 pixel value in 10^5 differs by 1.
CUBIC_A = -0.75


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [n_out, 4] of OpenCV's bicubic along one axis."""
    x = (np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5
    base = np.floor(x).astype(np.int64)
    t = np.abs(x - base)[:, None] - np.arange(-1, 3)[None, :]
    t, a = np.abs(t), CUBIC_A
    coef = np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a)
    return np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1), coef


def _resize_cubic(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(a, (width, height), interpolation=cv2.INTER_CUBIC) for uint8 [H, W, C]."""
    ix, cx = _cubic_taps(a.shape[1], width)
    iy, cy = _cubic_taps(a.shape[0], height)
    x = a.astype(np.float64)
    rows = sum(x[:, ix[:, k]] * cx[None, :, k, None] for k in range(4))
    out = sum(rows[iy[:, k]] * cy[:, k, None, None] for k in range(4))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _weights(n_in: int, n_out: int, interp: str) -> np.ndarray:
    """The (n_out, n_in) matrix that resamples one axis as cv2.resize does with `interp` (not cubic)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if interp == "nearest":  # OpenCV multiplies by 1 / (out / in), which rounds differently from in / out
        w[rows, np.minimum(np.floor(rows * (1.0 / (n_out / n_in))).astype(int), n_in - 1)] = 1.0
        return w
    if interp == "area" and scale >= 1:
        # Each output pixel averages the source interval [i*scale, (i+1)*scale), partial pixels by their coverage.
        lo, hi = rows * scale, (rows + 1) * scale
        j = np.arange(n_in)
        overlap = np.minimum(hi[:, None], j[None, :] + 1) - np.maximum(lo[:, None], j[None, :])
        return np.clip(overlap, 0, None) / scale
    src = (rows + 0.5) * scale - 0.5
    base = np.floor(src).astype(int)
    t = src - base
    for k in range(2):  # linear; replicated border: taps outside the image fold onto the edge pixel
        np.add.at(w, (rows, np.clip(base + k, 0, n_in - 1)), np.clip(1 - np.abs(t - k), 0, None))
    return w


def resize_array(a: np.ndarray, width: int, height: int, interp: str) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] resized to width x height ("nearest", "area", "cubic" or "linear")."""
    h, w = a.shape[:2]
    if (w, h) == (width, height):
        return a.copy()
    if interp == "cubic":
        return _resize_cubic(a if a.ndim == 3 else a[:, :, None], width, height).reshape(
            (height, width) + a.shape[2:])
    x = a.astype(np.float64)
    x = np.tensordot(_weights(h, height, interp), x, axes=(1, 0))
    x = np.moveaxis(np.tensordot(_weights(w, width, interp), x, axes=(1, 1)), 0, 1)
    if interp == "area" and (h / height, w / width) == (2, 2):
        return np.floor(x + 0.5).astype(np.uint8)  # OpenCV's 2x2 fast path rounds halves up: (sum + 2) >> 2
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_array(image) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image or an array (sd-webui-controlnet's HWC3: grey repeated, alpha composited on
    white)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise KilnError(f"control image: expected 8-bit pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise KilnError(f"control image: expected an RGB image, got an array of shape {a.shape}")
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        return np.clip(a[:, :, :3] * alpha + 255.0 * (1 - alpha), 0, 255).astype(np.uint8)
    return a


def resize_with_pad(a: np.ndarray, res: int) -> tuple[np.ndarray, tuple[int, int]]:
    """sd-webui-controlnet's resize_image_with_pad: scale so the short side is `res` (cubic when enlarging, area
    when shrinking), then pad right and bottom to multiples of 64 by repeating the edge. Returns the padded image
    and the (height, width) to crop the result back to."""
    h, w = a.shape[:2]
    k = float(res) / min(h, w)
    ht, wt = int(np.round(h * k)), int(np.round(w * k))
    a = resize_array(a, wt, ht, "cubic" if k > 1 else "area")
    pad_h, pad_w = -ht % 64, -wt % 64
    return np.pad(a, [(0, pad_h), (0, pad_w), (0, 0)], mode="edge"), (ht, wt)


# ------------------------------------------------------------------------------------------------------------- canny
TG22 = int(0.4142135623730950488 * (1 << 15) + 0.5)  # tan(22.5 deg) in OpenCV's 15-bit fixed point


def _sobel(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel x and y derivatives of [H, W, C] with replicated borders (as cv2.Canny calls cv2.Sobel)."""
    p = np.pad(g.astype(np.int32), [(1, 1), (1, 1), (0, 0)], mode="edge")
    dx = p[:, 2:] - p[:, :-2]
    dx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    dy = p[2:] - p[:-2]
    dy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    return dx, dy


def _suppress(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray, low: int) -> np.ndarray:
    """OpenCV's non-maximum suppression: keep a pixel above `low` that is a maximum across its gradient, the
    direction quantised to 0/45/90/135 degrees in fixed point; ties go to the left/upper pixel."""
    h, w = mag.shape
    m = np.pad(mag, 1)  # outside the image the magnitude is 0
    at = (lambda oy, ox: m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w])
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22x = x * TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << 16))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # s = +1: the "\" diagonal, s = -1: the "/" one
    keep = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)), False)
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    return keep & (mag > low)


def _hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected (through weak pixels) to a strong one, and the strong ones: grown frontier by
    frontier, so the cost is proportional to the edge pixels, not to the longest chain times the image."""
    h, w = weak.shape
    cand = np.pad(weak | strong, 1).ravel()
    out = np.zeros_like(cand)
    stride = w + 2
    frontier = np.flatnonzero(np.pad(strong, 1).ravel())
    out[frontier] = True
    steps = np.array([-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1])
    while frontier.size:
        nb = (frontier[:, None] + steps[None, :]).ravel()
        nb = np.unique(nb[cand[nb] & ~out[nb]])
        out[nb] = True
        frontier = nb
    return out.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(a, low, high) with its defaults (aperture 3, L1 gradient |gx|+|gy|, no blur): [H, W] of 0/255.
    On a colour image each pixel takes the gradient of its channel with the largest magnitude (the first on
    ties), as OpenCV does."""
    if low > high:
        low, high = high, low
    low, high = int(np.floor(low)), int(np.floor(high))
    dx, dy = _sobel(a if a.ndim == 3 else a[:, :, None])
    norm = np.abs(dx) + np.abs(dy)
    pick = np.argmax(norm, axis=2)[:, :, None]  # argmax: the first channel on ties, as OpenCV's strict ">"
    mag = np.take_along_axis(norm, pick, 2)[:, :, 0]
    dx = np.take_along_axis(dx, pick, 2)[:, :, 0]
    dy = np.take_along_axis(dy, pick, 2)[:, :, 0]
    weak = _suppress(mag, dx, dy, low)
    edges = _hysteresis(weak, weak & (mag > high))
    return edges.astype(np.uint8) * 255


# ----------------------------------------------------------------------------------------------------- preprocessors
# Each takes uint8 [H, W, 3], the processor resolution and the two thresholds, and returns uint8 [H, W, 3].

def _none(a: np.ndarray, res: int, thr_a: float, thr_b: float) -> np.ndarray:
    return a


def _invert(a: np.ndarray, res: int, thr_a: float, thr_b: float) -> np.ndarray:
    return 255 - a


def _canny(a: np.ndarray, res: int, thr_a: float, thr_b: float) -> np.ndarray:
    # sd-webui-controlnet: cv2.Canny(resize_image_with_pad(img, res), int(a), int(b)), grey to RGB, pad removed.
    padded, (h, w) = resize_with_pad(a, res)
    edges = canny(padded, int(thr_a), int(thr_b))[:h, :w]
    return np.repeat(edges[:, :, None], 3, axis=2)


def _threshold(a: np.ndarray, res: int, thr_a: float, thr_b: float) -> np.ndarray:
    # White where every channel is above the threshold (the darkest channel decides).
    padded, (h, w) = resize_with_pad(a, res)
    white = padded[:h, :w].min(axis=2) > thr_a
    return np.repeat(white[:, :, None], 3, axis=2).astype(np.uint8) * 255


def _tile_resample(a: np.ndarray, res: int, thr_a: float, thr_b: float) -> np.ndarray:
    # Down-sampled by the rate (area), not resized back: the control image's fit does that. Rates under 1.1 keep it.
    if thr_a < 1.1:
        return a
    h, w = a.shape[:2]
    return resize_array(a, max(1, int(w / float(thr_a))), max(1, int(h / float(thr_a))), "area")


@dataclass(frozen=True)
class Slider:
    """One of sd-webui-controlnet's preprocessor sliders, as its API describes it (`api_json`)."""
    name: str
    value: float
    min: float
    max: float
    step: float = 0.01  # sd-webui-controlnet's default step, which its API reports for sliders that set none

    def json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


# sd-webui-controlnet shows its default resolution slider (128-2048, step 8) for every preprocessor that does not
# hide it, "none" and its legacy ones (threshold, tile_resample) included; the API reports it the same way.
RESOLUTION = Slider("Resolution", 512, 128, 2048, 8)


@dataclass(frozen=True)
class Module:
    name: str  # sd-webui-controlnet's module name (`module` in a ControlNet unit)
    label: str  # its UI name, which it accepts as well
    fn: Callable[[np.ndarray, int, float, float], np.ndarray]
    priority: int  # its sorting priority (module_list order)
    sliders: tuple = ()  # (threshold_a, threshold_b) sliders, None where it has none
    resolution: bool = True  # whether its resolution slider is shown
    uses_res: bool = False  # whether the processor resolution changes the result
    inpaint: bool = False  # the control is the image with the mask: see inpaint_hint()
    tags: tuple = ()


MODULES: dict[str, Module] = {m.name: m for m in (
    Module("none", "none", _none, 10),
    Module("canny", "canny", _canny, 100, (Slider("Low Threshold", 100, 0, 256, 1),
                                           Slider("High Threshold", 200, 0, 256, 1)), uses_res=True, tags=("Canny",)),
    Module("invert", "invert (from white bg & black line)", _invert, 20, resolution=False,
           tags=("Canny", "Lineart", "Scribble", "Sketch", "MLSD")),
    Module("threshold", "threshold", _threshold, 0, (Slider("Binarization Threshold", 127, 0, 255),), uses_res=True),
    Module("tile_resample", "tile_resample", _tile_resample, 100, (Slider("Down Sampling Rate", 1.0, 1.0, 8.0),),
           tags=("Tile", "Blur")),
    Module("inpaint", "inpaint_global_harmonious", _none, 0, resolution=False, inpaint=True, tags=("Inpaint",)),
    Module("inpaint_only", "inpaint_only", _none, 100, resolution=False, inpaint=True, tags=("Inpaint",)),
)}

# sd-webui-controlnet's preprocessors that run a network, by module name and UI label: refused by name.
NEEDS_WEIGHTS = {
    "depth": "depth_midas", "depth_leres": "depth_leres", "depth_leres++": "depth_leres++", "depth_zoe": "depth_zoe",
    "depth_anything": "depth_anything", "depth_anything_v2": "depth_anything_v2",
    "depth_hand_refiner": "depth_hand_refiner", "normal_map": "normal_midas", "normal_bae": "normal_bae",
    "normal_dsine": "normal_dsine", "hed": "softedge_hed", "hed_safe": "softedge_hedsafe",
    "pidinet": "softedge_pidinet", "pidinet_safe": "softedge_pidisafe", "te_hed": "softedge_teed",
    "pidinet_sketch": "t2ia_sketch_pidi", "pidinet_scribble": "scribble_pidinet", "scribble_hed": "scribble_hed",
    "mlsd": "mlsd", "openpose": "openpose", "openpose_hand": "openpose_hand", "openpose_face": "openpose_face",
    "openpose_faceonly": "openpose_faceonly", "openpose_full": "openpose_full",
    "dw_openpose_full": "dw_openpose_full", "animal_openpose": "animal_openpose", "densepose": "densepose",
    "densepose_parula": "densepose_parula", "mediapipe_face": "mediapipe_face", "segmentation": "seg_ufade20k",
    "oneformer_coco": "seg_ofcoco", "oneformer_ade20k": "seg_ofade20k", "anime_face_segment": "seg_anime_face",
    "lineart": "lineart_realistic", "lineart_coarse": "lineart_coarse", "lineart_anime": "lineart_anime",
    "lineart_anime_denoise": "lineart_anime_denoise", "inpaint_only+lama": "inpaint_only+lama",
    "clip_vision": "t2ia_style_clipvision", "revision_clipvision": "revision_clipvision",
    "revision_ignore_prompt": "revision_ignore_prompt", "ip-adapter_clip_sd15": "ip-adapter_clip_h",
    "ip-adapter_clip_sdxl": "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_sdxl_plus_vith",
    "ip-adapter_face_id": "ip-adapter_face_id", "ip-adapter_face_id_plus": "ip-adapter_face_id_plus",
    "instant_id_face_embedding": "instant_id_face_embedding",
    "instant_id_face_keypoints": "instant_id_face_keypoints",
}
# Weight-free in sd-webui-controlnet but not (yet) in kiln: refused with a different reason.
NOT_IMPLEMENTED = {
    "lineart_standard": "lineart_standard (from white bg & black line)", "scribble_xdog": "scribble_xdog",
    "blur_gaussian": "blur_gaussian", "color": "t2ia_color_grid", "shuffle": "shuffle",
    "recolor_luminance": "recolor_luminance", "recolor_intensity": "recolor_intensity",
    "tile_colorfix": "tile_colorfix", "tile_colorfix+sharp": "tile_colorfix+sharp",
    "reference_only": "reference_only", "reference_adain": "reference_adain",
    "reference_adain+attn": "reference_adain+attn",
}


def _lookup(table: dict[str, str], key: str) -> str | None:
    for name, label in table.items():
        if key in (name.lower(), label.lower()):
            return name
    return None


def find(name: str | None) -> Module:
    """The module for a name or UI label, in any case ("canny", "Canny", "invert (from white bg & black line)");
    None or "" is "none". Unknown and unavailable ones are a one-line KilnError."""
    key = (name or "none").strip().lower()
    found = _lookup({m.name: m.label for m in MODULES.values()}, key)
    if found:
        return MODULES[found]
    if _lookup(NEEDS_WEIGHTS, key):
        raise KilnError(f"ControlNet preprocessor {name!r} runs a network whose weights kiln does not have; "
                        f"preprocess the image elsewhere and send it with module 'none'")
    if _lookup(NOT_IMPLEMENTED, key):
        raise KilnError(f"ControlNet preprocessor {name!r} is not implemented in kiln; available: "
                        f"{', '.join(MODULES)}")
    raise KilnError(f"unknown ControlNet preprocessor {name!r}; available: {', '.join(MODULES)}")


def _slider_value(module: Module, index: int, value, field_name: str) -> float:
    """A threshold: None or -1 (sd-webui-controlnet's "unset") is the slider's default; others must lie in its
    range. A module without that slider takes only the unset values."""
    slider = module.sliders[index] if index < len(module.sliders) else None
    if value is None or value == -1:
        return slider.value if slider else 0.0
    if slider is None:
        raise KilnError(f"{field_name}: the {module.name} preprocessor takes no {field_name} (got {value})")
    if not slider.min <= float(value) <= slider.max:
        raise KilnError(f"{field_name}: {slider.name} of {module.name} must be in "
                        f"{slider.min:g}..{slider.max:g}, not {value}")
    return float(value)


def run(name: str | None, image, res: int | None = 512, threshold_a: float | None = None,
        threshold_b: float | None = None) -> Image.Image:
    """Run a preprocessor on an image (PIL image or uint8 array) and return the control map as a PIL RGB image.
    `res` (processor_res) is the short side the image is scaled to first, for the modules that use it (canny,
    threshold); None or -1 means 512. Inpaint modules return the image as is: the mask joins it in
    `inpaint_hint`."""
    module = find(name)
    res = 512 if res is None or res == -1 else res
    if not isinstance(res, (int, np.integer)) or isinstance(res, bool) or not 64 <= res <= 16384:
        raise KilnError(f"processor_res must be a whole number of pixels in 64..16384, not {res!r}")
    thr_a = _slider_value(module, 0, threshold_a, "threshold_a")
    thr_b = _slider_value(module, 1, threshold_b, "threshold_b")
    return Image.fromarray(module.fn(to_array(image), int(res), thr_a, thr_b), "RGB")


def module_list() -> dict:
    """`GET /controlnet/module_list?alias_names=false`: sd-webui-controlnet's order ("none" first, then by sorting
    priority and label, descending) and each module's sliders. model_free is sd-webui-controlnet's "needs no
    ControlNet model" flag (the reference_* modules), false for all of these."""
    rest = sorted((m for m in MODULES.values() if m.name != "none"),
                  key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)
    ordered = [MODULES["none"], *rest]
    detail = {}
    for m in ordered:
        sliders = ([RESOLUTION.json()] if m.resolution else []) + [s.json() for s in m.sliders]
        detail[m.name] = {"model_free": False, "sliders": sliders}
    return {"module_list": [m.name for m in ordered], "module_detail": detail}


# --------------------------------------------------------------------------------------------- fitting the control
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# sd-webui-controlnet's aliases, A1111's numbers (3, "Just Resize (Latent upscale)", is Just Resize there too) and
# kiln's own img2img spellings.
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize", "just-resize": "Just Resize",
    "crop-and-resize": "Crop and Resize", "resize-and-fill": "Resize and Fill",
    **{m.lower(): m for m in RESIZE_MODES},
}


def resize_mode(mode) -> str:
    """The canonical name of a resize mode: a name, an alias, or A1111's number 0/1/2 (3 = Just Resize)."""
    if isinstance(mode, (int, np.integer)) and not isinstance(mode, bool):
        if 0 <= mode <= 3:
            return RESIZE_MODES[0 if mode == 3 else int(mode)]
    elif isinstance(mode, str) and mode.strip().lower() in _RESIZE_ALIASES:
        return _RESIZE_ALIASES[mode.strip().lower()]
    raise KilnError(f"resize_mode must be one of {', '.join(RESIZE_MODES)} (or 0, 1, 2), not {mode!r}")


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, mode="Crop and Resize") -> int:
    """sd-webui-controlnet's "pixel perfect" processor resolution for an image of `image_size` (width, height) that
    will fill a width x height generation: the short side the image has once fitted (Resize and Fill fits it
    inside, the other modes cover the frame)."""
    raw_w, raw_h = image_size
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode(mode) == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def _otsu(g: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (cv2.THRESH_OTSU): the level that best splits its histogram in two."""
    hist = np.bincount(g.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return int(np.argmax(np.nan_to_num(between, nan=-1.0)))


def _fit(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """sd-webui-controlnet's high_quality_resize: nearest for maps of 3..199 colours (segmentation), area to shrink,
    cubic to enlarge; a black-and-white map stays black and white (Otsu). A 4th channel is the inpaint mask,
    resized alike and cut at 127."""
    mask = x[:, :, 3] if x.shape[2] == 4 else None
    rgb = x[:, :, :3]
    if rgb.shape[:2] == (height, width):
        y = rgb
    else:
        colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
        binary = colours == 2 and rgb.min() < 16 and rgb.max() > 240
        shrink = width * height < rgb.shape[0] * rgb.shape[1]
        interp = "nearest" if 2 < colours < 200 else "area" if shrink else "cubic"
        if interp == "area" and (width > rgb.shape[1] or height > rgb.shape[0]):
            interp = "linear"  # one axis grows: OpenCV's area mode interpolates linearly there
        y = resize_array(rgb, width, height, interp)
        if mask is not None:
            mask = resize_array(mask, width, height, interp)
        if binary:
            g = np.clip(y.astype(np.float32).mean(axis=2), 0, 255).astype(np.uint8)
            y = np.repeat(((g > _otsu(g)) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if mask is not None:
        y = np.concatenate([y, ((mask > 127) * 255).astype(np.uint8)[:, :, None]], axis=2)
    return y


def resize_for(image, width: int, height: int, mode="Crop and Resize") -> Image.Image:
    """A control map fitted to the generation size as sd-webui-controlnet does: Just Resize stretches; Crop and
    Resize scales to cover and crops the centre; Resize and Fill scales to fit inside and fills the borders with the
    median colour of the map's edge pixels. An RGBA image's alpha is an inpaint mask (the fill counts as masked).
    Returns RGB, or RGBA for RGBA input."""
    mode = resize_mode(mode)
    if isinstance(image, Image.Image):
        x = np.asarray(image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB"))
    else:
        x = np.asarray(image)
        x = x if x.ndim == 3 and x.shape[2] == 4 else to_array(x)
    out_mode = "RGBA" if x.shape[2] == 4 else "RGB"
    if mode == "Just Resize":
        return Image.fromarray(_fit(x, width, height), out_mode)
    old_h, old_w = x.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
        fill = np.median(borders, axis=0).astype(np.uint8)
        if x.shape[2] == 4:
            fill[3] = 255
        y = _fit(x, int(np.round(old_w * k)), int(np.round(old_h * k)))[:height, :width]
        canvas = np.tile(fill[None, None], (height, width, 1))
        top, left = (height - y.shape[0]) // 2, (width - y.shape[1]) // 2
        canvas[top:top + y.shape[0], left:left + y.shape[1]] = y
        return Image.fromarray(canvas, out_mode)
    k = max(k0, k1)
    y = _fit(x, int(np.round(old_w * k)), int(np.round(old_h * k)))
    top, left = max(0, (y.shape[0] - height) // 2), max(0, (y.shape[1] - width) // 2)
    return Image.fromarray(np.ascontiguousarray(y[top:top + height, left:left + width]), out_mode)


def inpaint_hint(image, mask) -> np.ndarray:
    """The ControlNet 1.1 inpaint model's input, float32 [H, W, 3]: the image in 0..1 with the masked pixels
    (mask > 0.5 of full scale) set to -1, as sd-webui-controlnet's hook builds it (`c * (1 - m) - m`). `mask`: a
    PIL image or array the image's size, white = repaint."""
    rgb = to_array(image).astype(np.float32) / 255.0
    m = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if m.ndim == 3:
        m = m[:, :, -1] if m.shape[2] in (2, 4) else m.max(axis=2)
    if m.shape != rgb.shape[:2]:
        raise KilnError(f"inpaint mask is {m.shape[1]}x{m.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}; "
                        f"they must match")
    scale = 255.0 if m.dtype == np.uint8 else 1.0
    masked = (m.astype(np.float32) / scale) > 0.5
    rgb[masked] = -1.0
    return rgb
