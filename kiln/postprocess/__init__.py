"""What happens to pixels after decoding: watermark, grids, file naming and atomic saving."""
from .files import OutputDir
from .grid import make_grid
from .watermark import MIN_WATERMARK_SIZE, decode_watermark, put_watermark

__all__ = ["OutputDir", "make_grid", "put_watermark", "decode_watermark", "MIN_WATERMARK_SIZE"]
