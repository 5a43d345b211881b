"""Captioned-shapes demo data for kiln's tiny embedded model: the procedural dataset (`kiln.demo.shapes`) and its
deterministic pixel evaluator (`kiln.demo.evaluate`). numpy + PIL only."""
from .evaluate import Analysis, analyze, score
from .shapes import COLORS, POSITIONS, SHAPES, SIZES, Labels, caption, held_out_combos, heldout_prompts, render, sample

__all__ = [
    "COLORS", "SHAPES", "POSITIONS", "SIZES", "Labels", "render", "caption", "held_out_combos", "sample",
    "heldout_prompts", "Analysis", "analyze", "score",
]
