"""Which upscaler architecture a state dict holds, and its sizes, from tensor names and shapes alone.

The rules follow spandrel's (github.com/chaiNNer-org/spandrel, `architectures/*/__init__.py`), the detection ComfyUI
and chaiNNer use, so that a file either library reads builds the same network here. Each `*_model` function takes
`shapes` (name → shape) and `get` (name → tensor, for the one size that only a buffer's values tell: DAT's window)
and returns (the network, built on whatever device is current, e.g. meta; a mapping from the network's tensor names
to the file's), raising ValueError with a short reason when the file does not fit."""
from __future__ import annotations

import math
import re

from ..models.upscalers.compact import SRVGGNetCompact
from ..models.upscalers.dat import DAT
from ..models.upscalers.esrgan import RRDBNet
from ..models.upscalers.swinir import SwinIR


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
    if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.(conv\d|conv1x1)(?:\.0)?\.(weight|bias)", key):
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


def esrgan_model(shapes, get):
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


def compact_model(shapes, get):
    last = seq_len(shapes, "body") - 1
    nf, in_nc = shapes["body.0.weight"][:2]
    scale, out_nc = scale_and_channels(shapes[f"body.{last}.weight"][0], in_nc)
    model = SRVGGNetCompact(in_nc=in_nc, out_nc=out_nc, nf=nf, num_conv=(last - 2) // 2, scale=scale)
    return model, {k: k for k in shapes}


# ------------------------------------------------------------------------------------------------ SwinIR

SWIN_BLOCK = "layers.0.residual_group.blocks.0."
# Buffers the files carry that kiln derives instead (the shifted-window mask is for the training size only).
DERIVED = re.compile(r".*\.(attn_mask|attn_mask_[01]|relative_position_index|rpe_biases)$")


def is_swinir(shapes) -> bool:
    return (has_all(shapes, SWIN_BLOCK + "norm1.weight", SWIN_BLOCK + "mlp.fc1.bias", SWIN_BLOCK + "attn.qkv.weight",
                    SWIN_BLOCK + "attn.relative_position_bias_table")
            and ("conv_first.weight" in shapes or "conv_first.1.weight" in shapes))


def pixelshuffle_scale(shapes, prefix: str = "upsample") -> tuple[int, int]:
    """(scale, features) of a chain `prefix.0`, `prefix.2`… of (conv to r²·C, pixel shuffle r)."""
    scale, nf, i = 1, 64, 0
    while f"{prefix}.{i}.weight" in shapes:
        out, nf = shapes[f"{prefix}.{i}.weight"][:2]
        scale *= math.isqrt(out // nf)
        i += 2
    return scale, nf


def swin_window(shapes, key: str) -> int:
    """The window side from a relative-position bias table of (2w-1)² rows."""
    return (math.isqrt(shapes[key][0]) + 1) // 2


def swinir_model(shapes, get):
    first = "conv_first.1.weight" if "conv_first.1.weight" in shapes else "conv_first.weight"
    dim, in_ch = shapes[first][:2]
    unshuffle = math.isqrt(in_ch // 3) if first == "conv_first.1.weight" else 1
    in_nc = in_ch // unshuffle**2
    nf = 64
    if "conv_before_upsample.0.weight" in shapes:
        nf = shapes["conv_before_upsample.0.weight"][0]
        if "conv_up1.weight" in shapes:
            upsampler = "nearest+conv"
            upscale = 2 ** sum(1 for k in shapes if re.fullmatch(r"conv_up\d\.weight", k))
        else:
            upsampler = "pixelshuffle"
            upscale = pixelshuffle_scale(shapes)[0]
    elif "upsample.0.weight" in shapes:
        upsampler = "pixelshuffledirect"
        upscale = math.isqrt(shapes["upsample.0.weight"][0] // in_nc)
    else:
        upsampler, upscale = "", 1
    window = swin_window(shapes, SWIN_BLOCK + "attn.relative_position_bias_table")
    layers = seq_len(shapes, "layers")
    depths = [seq_len(shapes, f"layers.{i}.residual_group.blocks") for i in range(layers)]
    heads = [shapes[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"][1] for i in range(layers)]
    model = SwinIR(in_nc=in_nc, dim=dim, depths=depths, heads=heads, window=window,
                   mlp_hidden=shapes[SWIN_BLOCK + "mlp.fc1.bias"][0], upscale=upscale, upsampler=upsampler,
                   resi="1conv" if "conv_after_body.weight" in shapes else "3conv", unshuffle=unshuffle, nf=nf,
                   patch_norm="patch_embed.norm.weight" in shapes,
                   # the JPEG-artifact models alone use 7×7 windows, and they work on 0..255 values
                   img_range=255.0 if window == 7 else 1.0)
    return model, {k: k for k in shapes if not DERIVED.fullmatch(k)}


# ------------------------------------------------------------------------------------------------ DAT

DAT_BLOCK = "layers.0.blocks.0."


def is_dat(shapes) -> bool:
    return (has_all(shapes, "conv_first.weight", "before_RG.1.weight", "norm.weight")
            and has_all(shapes, *(DAT_BLOCK + k for k in (
                "norm1.weight", "ffn.fc1.weight", "ffn.sg.norm.weight", "ffn.sg.conv.weight", "attn.qkv.weight",
                "attn.dwconv.0.weight", "attn.channel_interaction.1.weight", "attn.spatial_interaction.0.weight",
                "attn.attns.0.pos.pos_proj.weight")))
            and ("conv_after_body.weight" in shapes or "conv_after_body.4.weight" in shapes)
            and ("conv_last.weight" in shapes or "upsample.0.weight" in shapes))


def dat_split(shapes, get) -> tuple[int, int]:
    """The spatial window (rows, columns): the last row of `rpe_biases` holds the largest offsets, (s0-1, s1-1). A
    file without that buffer gets DAT's own default, (8, 32) (shapes alone cannot order the two sides)."""
    key = DAT_BLOCK + "attn.attns.0.rpe_biases"
    if key not in shapes:
        return 8, 32
    last = get(key)[-1]
    return int(last[0]) + 1, int(last[1]) + 1


def dat_model(shapes, get):
    dim, in_nc = shapes["conv_first.weight"][:2]
    layers = seq_len(shapes, "layers")
    depths = [seq_len(shapes, f"layers.{i}.blocks") for i in range(layers)]
    # heads: a channel-attention block's temperature has one per head; a group of one block shows half of them
    heads = [shapes[f"layers.{i}.blocks.1.attn.temperature"][0] if d >= 2
             else 2 * shapes[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"][0] for i, d in enumerate(depths)]
    if "conv_last.weight" in shapes:
        upsampler = "pixelshuffle"
        upscale, nf = pixelshuffle_scale(shapes)
    else:
        upsampler, nf = "pixelshuffledirect", 64
        upscale = math.isqrt(shapes["upsample.0.weight"][0] // in_nc)
    model = DAT(in_nc=in_nc, dim=dim, depths=depths, heads=heads, split=dat_split(shapes, get),
                hidden=shapes[DAT_BLOCK + "ffn.fc1.weight"][0], qkv_bias=DAT_BLOCK + "attn.qkv.bias" in shapes,
                upscale=upscale, upsampler=upsampler, resi="1conv" if "conv_after_body.weight" in shapes else "3conv",
                nf=nf)
    return model, {k: k for k in shapes if not DERIVED.fullmatch(k)}


#: (test, builder) in the order tried: the loose compact test last.
ARCHITECTURES = [
    ("ESRGAN", is_esrgan, esrgan_model),
    ("SwinIR", is_swinir, swinir_model),
    ("DAT", is_dat, dat_model),
    ("RealESRGAN compact", is_compact, compact_model),
]
