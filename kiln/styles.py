"""Prompt styles as AUTOMATIC1111 keeps them: a `styles.csv` with the columns name, prompt, negative_prompt.

Applying a style to a prompt: a style text holding `{prompt}` has it replaced by the prompt; any other style text
is appended after ", " (empty parts dropped). Styles apply in the order they are named, to the prompt and the
negative prompt alike. Every front end applies them with `StyleTable.apply` before generation, so the infotext
records the expanded prompts, as A1111's does; reading an infotext back, `StyleTable.extract` finds the styles in
an expanded prompt again (A1111's "Styles array").
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import KilnError

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge(style_text: str, prompt: str) -> str:
    """One style text applied to a prompt."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


_SPACES = re.compile("  +")


def _unmerge(style_text: str, prompt: str) -> str | None:
    """The prompt `merge(style_text, p)` was made from, or None when `prompt` was not made so (spaces runs
    collapsed, as A1111 compares them)."""
    prompt, style_text = _SPACES.sub(" ", prompt.strip()), _SPACES.sub(" ", style_text.strip())
    if PLACEHOLDER in style_text:
        left, _, right = style_text.partition(PLACEHOLDER)
        if prompt.startswith(left) and prompt.endswith(right) and len(prompt) >= len(left) + len(right):
            return prompt[len(left):len(prompt) - len(right)]
        return None
    if not prompt.endswith(style_text):
        return None
    rest = prompt[:len(prompt) - len(style_text)]
    return rest[:-2] if rest.endswith(", ") else rest


class StyleTable:
    """The styles of one styles file, by name (a later row with the same name replaces an earlier one)."""

    def __init__(self, styles=(), path: str | None = None):
        self.styles: dict[str, Style] = {s.name: s for s in styles}
        self.path = path

    @classmethod
    def read(cls, path) -> StyleTable:
        """A1111's styles.csv (UTF-8, with or without a BOM; the old `text` column is read as `prompt`)."""
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, skipinitialspace=True)
                rows = list(reader)
                columns = set(reader.fieldnames or ())
        except FileNotFoundError:
            raise KilnError(f"styles file {path}: no such file") from None
        except IsADirectoryError:
            raise KilnError(f"styles file {path}: a folder, not a CSV file") from None
        except UnicodeDecodeError:
            raise KilnError(f"styles file {path}: not UTF-8 text") from None
        except csv.Error as e:
            raise KilnError(f"styles file {path}: not a readable CSV file ({e})") from None
        if columns and ("name" not in columns or not {"prompt", "text"} & columns):
            raise KilnError(f"styles file {path}: needs the columns name, prompt[, negative_prompt] "
                            f"(A1111's styles.csv), found {', '.join(sorted(c for c in columns if c)) or 'none'}")
        styles = []
        for row in rows:
            name = (row.get("name") or "").strip()
            if name:  # A1111 skips nameless rows too (they cannot be chosen)
                prompt = row.get("prompt") if "prompt" in row else row.get("text")
                styles.append(Style(name, prompt or "", row.get("negative_prompt") or ""))
        return cls(styles, str(path))

    @property
    def names(self) -> list[str]:
        return list(self.styles)

    def find(self, names) -> list[Style]:
        """The named styles, in order; an unknown name is an error that lists the ones there are."""
        missing = [n for n in names if n not in self.styles]
        if missing:
            have = ", ".join(repr(n) for n in self.styles) or "none (no styles file given)"
            raise KilnError(f"unknown style{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                            f"the styles are: {have}")
        return [self.styles[n] for n in names]

    def apply(self, names, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """(prompt, negative prompt) with the named styles applied in order."""
        for style in self.find(names or ()):
            prompt = merge(style.prompt, prompt)
            negative_prompt = merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """The styles an expanded prompt pair was made with (as `apply` takes them), and the prompts before them:
        the last style applied is found first, and each style counts once."""
        found, left = [], list(self.styles.values())
        while True:
            for style in left:
                if not style.prompt and not style.negative_prompt:
                    continue
                p, n = _unmerge(style.prompt, prompt), _unmerge(style.negative_prompt, negative_prompt)
                if p is not None and n is not None:
                    found.append(style.name)
                    left.remove(style)
                    prompt, negative_prompt = p, n
                    break
            else:
                return found[::-1], prompt, negative_prompt


def read_styles(path) -> StyleTable:
    """The styles of a file, or an empty table for no file."""
    return StyleTable.read(Path(path)) if path else StyleTable()
