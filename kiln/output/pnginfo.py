"""PNG text chunks: A1111's "parameters" (default) or kiln's JSON "kiln-parameters"; and reading them back."""
from __future__ import annotations

import io
import json

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import KilnError
from ..pipeline.infotext import format_infotext, generation_fields, parse_infotext

FORMATS = ("a1111", "json", "none")


def pnginfo_for(fmt: str, infotext: str, params: dict) -> PngImagePlugin.PngInfo | None:
    if fmt == "none":
        return None
    info = PngImagePlugin.PngInfo()
    if fmt == "a1111":
        info.add_itxt("parameters", infotext)
    elif fmt == "json":
        info.add_itxt("kiln-parameters", json.dumps(params, ensure_ascii=False, sort_keys=True))
    else:
        raise KilnError(f"metadata format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return info


def png_bytes(image: Image.Image, infotext: str | None = None) -> bytes:
    """A PNG file in memory, with A1111's parameters text when there is one (what the HTTP APIs return)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo_for("a1111", infotext, {}) if infotext else None)
    return buf.getvalue()


USER_COMMENT, EXIF_IFD = 0x9286, 0x8769
UNICODE = b"UNICODE\0"  # EXIF's character code for UTF-16 text (big-endian, as piexif and A1111 write it)


def encode_image(image: Image.Image, fmt: str, quality: int = 80, infotext: str | None = None) -> tuple[bytes, str]:
    """(the file's bytes, its extension) as A1111 saves samples of this format: PNG with the parameters chunk;
    JPEG or WebP at `quality` with the parameters in EXIF UserComment."""
    if fmt == "png":
        return png_bytes(image, infotext), "png"
    exif = _exif_user_comment(infotext) if infotext else b""
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality, exif=exif)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, exif=exif)
    else:
        raise KilnError(f"image format must be png, jpg or webp, not {fmt!r}")
    return buf.getvalue(), fmt


def _exif_user_comment(text: str) -> bytes:
    """An EXIF block holding only UserComment (type UNDEFINED, as piexif writes it and A1111 reads it back):
    a little-endian TIFF with IFD0 pointing to the Exif IFD."""
    import struct

    data = UNICODE + text.encode("utf-16-be")
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", EXIF_IFD, 4, 1, 26) + struct.pack("<I", 0)
    exif_ifd = struct.pack("<H", 1) + struct.pack("<HHII", USER_COMMENT, 7, len(data), 44) + struct.pack("<I", 0)
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd0 + exif_ifd + data


def exif_comment(image: Image.Image) -> str | None:
    """The text of a JPEG's or WebP's EXIF UserComment (where A1111 keeps the parameters of such files)."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    body = raw[8:]
    return body.decode("utf-16-be" if raw[:8] == UNICODE else "latin-1", errors="replace").rstrip("\0")


def _json_to_infotext(params: dict) -> str:
    fields = generation_fields(params, params["seed"], params.get("model"), params.get("model_hash"))
    return format_infotext(params.get("prompt", ""), params.get("negative_prompt", ""), fields)


def read_text(path: str) -> str:
    """The A1111 parameters text of an image (made from kiln's JSON chunk when that is what it carries)."""
    try:
        with Image.open(path) as im:
            chunks = dict(im.info)
    except FileNotFoundError:
        raise KilnError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise KilnError(f"{path}: not a readable image ({e})") from None
    try:
        text = infotext_from_chunks(chunks)
    except KilnError as e:
        raise KilnError(f"{path}: {e}") from None
    if text is None:
        raise KilnError(f"{path}: carries no generation parameters (no A1111 'parameters' or kiln chunk)")
    return text


def infotext_from_chunks(chunks: dict) -> str | None:
    """The A1111 parameters text from a PNG's text chunks (made from kiln's JSON chunk if that is what it has)."""
    if isinstance(chunks.get("parameters"), str):
        return chunks["parameters"]
    if isinstance(chunks.get("kiln-parameters"), str):
        try:
            return _json_to_infotext(json.loads(chunks["kiln-parameters"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KilnError(f"its kiln-parameters chunk is damaged ({e})") from None
    return None


def read_parameters(path: str) -> dict:
    return parse_infotext(read_text(path))
