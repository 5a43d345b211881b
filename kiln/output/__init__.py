"""What becomes of finished images: PNG metadata (A1111's "parameters" text or kiln's JSON), grids, file naming
and one atomic writer, for every front end. (The pixels arrive finished: safety check, watermark and infotext
are the generation loop's last steps, `kiln.pipeline.generate`.)"""
from .files import OutputDir, save_png_atomic
from .grid import make_grid
from .pnginfo import png_bytes, pnginfo_for, read_parameters, read_text

__all__ = ["OutputDir", "save_png_atomic", "make_grid", "png_bytes", "pnginfo_for", "read_parameters", "read_text"]
