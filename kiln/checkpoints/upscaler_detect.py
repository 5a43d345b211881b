"""Which upscaler architecture a state dict holds, and its sizes, from tensor names and shapes alone.

The rules follow spandrel's (github.com/chaiNNer-org/spandrel, `architectures/*/__init__.py`), the detection ComfyUI
and chaiNNer use, so that a file either library reads builds the same network here. Each `*_model` function takes
`shapes` (name → shape) and returns (the network, built on whatever device is current, e.g. meta; a mapping from the
network's tensor names to the file's), raising ValueError with a short reason when the file does not fit."""
from __future__ import annotations

import math
import re

from ..models.upscalers.compact import SRVGGNetCompact
from ..models.upscalers.esrgan import RRDBNet


def seq_len(shapes, prefix: str) -> int:
    """1 + the highest N among names `prefix.N.…` (0 when there are none), as spandrel's get_seq_len."""
    found = [int(m[1]) for k in shapes if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def has_all(shapes, *keys: str) -> bool:
    return all(k in shapes for k in keys)


# ------------------------------------------------------------------------------------------------ ESRGAN / RRDBNet

def is_esrgan(shapes) -> bool:
    return (has_all(shapes, "model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")
            or has_all(shapes, "model.0.weight", "model.1.sub.0.RDB1.conv1x1.weight")  # ESRGAN+
            or has_all(shapes, "conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight")
            or has_all(shapes, "conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight",
                       "conv_last.weight"))  # BSRGAN / RealSR


def _original_esrgan_name(key: str, n: int) -> str | None:
    """BasicSR's name of a tensor of the original `model.N` layout (`n`: the length of that top-level sequence)."""
    if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.(conv\d)(?:\.0)?\.(weight|bias)", key):
        return f"body.{m[1]}.rdb{m[2]}.{m[3]}.{m[4]}"
    if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", key):
        return f"conv_body.{m[2]}"  # the trunk's last conv, after the RRDBs
    if not (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)):
        return None
    i, param = int(m[1]), m[2]
    # model.0 conv, model.1 the trunk, then (upsample, conv, act) per doubling, conv_hr, act, conv_last
    names = {0: "conv_first", n - 3: "conv_hr", n - 1: "conv_last"}
    names.update({3 * (u + 1): f"conv_up{u + 1}" for u in range((n - 5) // 3)})
    return f"{names[i]}.{param}" if i in names else None


def _bsrgan_name(key: str) -> str:
    """BasicSR's name of a tensor of BSRGAN's / RealSR's layout (or of BasicSR's own: unchanged)."""
    key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
    key = re.sub(r"^upconv(\d)\.", r"conv_up\1.", key)
    head, dot, rest = key.partition(".")
    return {"trunk_conv": "conv_body", "HRconv": "conv_hr"}.get(head, head) + dot + rest


def esrgan_names(shapes) -> dict[str, str]:
    """BasicSR name → the file's name, for any of the three layouts."""
    if "model.0.weight" in shapes:
        n = seq_len(shapes, "model")
        mapping = {_original_esrgan_name(k, n): k for k in shapes}
    else:
        mapping = {_bsrgan_name(k): k for k in shapes}
    if None in mapping:
        raise ValueError(f"an unexpected tensor {mapping[None]!r} for ESRGAN")
    return mapping


def esrgan_model(shapes):
    names = esrgan_names(shapes)
    ours = {k: shapes[v] for k, v in names.items()}
    nf, in_nc = ours["conv_first.weight"][:2]
    out_nc = ours["conv_last.weight"][0]
    upsamples = sum(1 for k in ours if re.fullmatch(r"conv_up\d\.weight", k))
    # Real-ESRGAN folds 2× and 1× inputs by pixel-unshuffle, so that its 4× body gives 2× (1×): 4 or 16× the channels
    shuffle = int(math.isqrt(in_nc // out_nc)) if in_nc in (4 * out_nc, 16 * out_nc) else 1
    if 2**upsamples % shuffle:
        raise ValueError(f"a pixel-unshuffle by {shuffle} before a {2**upsamples}× body")
    model = RRDBNet(in_nc=in_nc, out_nc=out_nc, nf=nf, nb=seq_len(ours, "body"), gc=ours["body.0.rdb1.conv1.weight"][0],
                    upsamples=upsamples, shuffle=shuffle, plus=any(".conv1x1." in k for k in ours))
    return model, names


# ------------------------------------------------------------------------------------------------ Real-ESRGAN compact

def is_compact(shapes) -> bool:
    return has_all(shapes, "body.0.weight", "body.1.weight") and len(shapes["body.1.weight"]) == 1  # a PReLU


def scale_and_channels(out_channels: int, in_nc: int) -> tuple[int, int]:
    """(scale, channels) with scale² · channels = `out_channels` of a conv before pixel shuffle; the channels are
    tried as the input's, then 3, 4, 1 (spandrel's rule: shapes alone cannot tell 12 = 2²·3 from 12 = 1²·12)."""
    for c in (in_nc, 3, 4, 1):
        if out_channels % c == 0 and math.isqrt(out_channels // c) ** 2 == out_channels // c:
            return math.isqrt(out_channels // c), c
    raise ValueError(f"{out_channels} channels before pixel shuffle fit no scale")


def compact_model(shapes):
    last = seq_len(shapes, "body") - 1
    nf, in_nc = shapes["body.0.weight"][:2]
    scale, out_nc = scale_and_channels(shapes[f"body.{last}.weight"][0], in_nc)
    model = SRVGGNetCompact(in_nc=in_nc, out_nc=out_nc, nf=nf, num_conv=(last - 2) // 2, scale=scale)
    return model, {k: k for k in shapes}


#: (test, builder) in the order tried: the loose compact test last.
ARCHITECTURES = [
    ("ESRGAN", is_esrgan, esrgan_model),
    ("RealESRGAN compact", is_compact, compact_model),
]
