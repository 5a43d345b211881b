"""The ControlNet files of a folder (sd-webui-controlnet's `models/ControlNet`, or `--controlnet-dir`), found as
sd-webui-controlnet finds them: by "name [8-hex legacy hash]", by name, or by file name. Used by `kiln serve` and by
`--from-png`, which names a unit's model by the title its infotext records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
DEFAULT_DIR = "models/ControlNet"  # sd-webui-controlnet's own folder, relative to where the server starts


@dataclass(frozen=True)
class ControlNetEntry:
    path: str
    hash: str  # A1111's legacy 8-hex hash (sha256 of 64 KiB at 1 MiB), as sd-webui-controlnet shows it

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


class ControlNetIndex:
    """The ControlNet files of a folder (and its subfolders), found by "name [hash]", name or file name; the
    folder is read again on `refresh` (hashes kept for files whose size and time are unchanged)."""

    def __init__(self, folder: str | None, extra=()):
        self.folder = folder
        self.extra = [Path(p) for p in extra]  # files listed beside the folder's (the embedded demo ControlNet)
        self.entries: list[ControlNetEntry] = []
        self._seen: dict[tuple, ControlNetEntry] = {}
        self.refresh()

    @classmethod
    def for_config(cls, folder: str | None, extra=()) -> ControlNetIndex:
        """`--controlnet-dir`, else sd-webui-controlnet's `models/ControlNet` when it exists (and `extra` files)."""
        return cls(folder if folder else DEFAULT_DIR if Path(DEFAULT_DIR).is_dir() else None, extra)

    def refresh(self):
        from ..checkpoints.hashes import legacy_hash

        root = Path(self.folder) if self.folder else None
        files = sorted(root.resolve().rglob("*"), key=lambda p: (p.stem.lower(), str(p))) \
            if root is not None and root.is_dir() else []
        found, seen = [], {}
        for p in files + [p.resolve() for p in self.extra if p.resolve() not in files]:
            if p.suffix.lower() not in SUFFIXES or not p.is_file():
                continue
            st = p.stat()
            key = (str(p), st.st_size, st.st_mtime_ns)
            seen[key] = self._seen.get(key) or ControlNetEntry(str(p), legacy_hash(p))
            found.append(seen[key])
        self.entries, self._seen = found, seen

    def find(self, name) -> ControlNetEntry | None:
        """sd-webui-controlnet's lookup: the exact title, then the name (any case, a "[hash]" that differs
        ignored, as it does), or the file name."""
        if not isinstance(name, str) or not name.strip():
            return None
        name = name.strip()
        exact = next((e for e in self.entries if name in (e.title, e.name, Path(e.path).name)), None)
        if exact is not None:
            return exact
        bare = name.split(" [")[0].strip().lower()
        return next((e for e in self.entries if bare in (e.name.lower(), Path(e.path).name.lower())), None)

    def titles(self) -> list[str]:
        return [e.title for e in self.entries]
