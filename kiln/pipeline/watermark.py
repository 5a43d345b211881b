"""The invisible watermark of the CompVis scripts (invisible-watermark, dwtDct, on BGR pixels)."""
import numpy as np

# invisible-watermark refuses smaller images, and decodes unreliably near this size.
MIN_WATERMARK_SIZE = 256


def can_watermark(pixels: np.ndarray) -> bool:
    return min(pixels.shape[:2]) >= MIN_WATERMARK_SIZE


def put_watermark(pixels: np.ndarray, text: str, passes: int = 3) -> np.ndarray:
    """RGB uint8 [H, W, 3] → watermarked RGB uint8 (same shape), as CompVis' `put_watermark`.

    dwtDct marks the largest coefficient of each block, which can move when the mark changes it; so the mark
    is re-applied (at most `passes` times) until the standard decoder reads it back. Images with very smooth
    gradients may still not carry it: `has_watermark` tells."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", text.encode("utf-8"))
    out = pixels
    for _ in range(passes):
        out = np.ascontiguousarray(enc.encode(np.ascontiguousarray(out[:, :, ::-1]), "dwtDct")[:, :, ::-1])
        if decode_watermark(out, len(text.encode("utf-8"))) == text:
            break
    return out


def has_watermark(pixels: np.ndarray, text: str) -> bool:
    return decode_watermark(pixels, len(text.encode("utf-8"))) == text


def decode_watermark(pixels: np.ndarray, length: int) -> str | None:
    """Read `length` bytes of watermark from RGB pixels; None where it is not valid UTF-8."""
    from imwatermark import WatermarkDecoder

    dec = WatermarkDecoder("bytes", 8 * length)
    try:
        return dec.decode(np.ascontiguousarray(pixels[:, :, ::-1]), "dwtDct").decode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return None
