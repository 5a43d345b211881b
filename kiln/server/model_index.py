"""The checkpoints a server offers: `ModelEntry` (plain data, the same locally and across Ray) and `ModelIndex`
(the `--ckpt` and `--ckpt-dir` files, found by title, name or hash)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

@dataclass
class ModelEntry:
    """A checkpoint a client may ask for: plain data, the same in the local server and across Ray."""
    path: str
    filename: str
    name: str
    sha256: str | None = None

    @classmethod
    def of(cls, path: Path) -> ModelEntry:
        return cls(str(path), path.name, path.stem if path.is_file() else path.name)

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.short_hash}]" if self.sha256 else self.filename

    def answers_to(self, name: str) -> bool:
        """A1111's ways to name a model: its title, file name or name, or its SHA-256 (whole, 10 or 8 digits)."""
        h = self.sha256
        return name in (self.title, self.filename, self.name) or bool(h) and name.lower() in (h, h[:10], h[:8])


SMALL_FILE = 256 * 1024 * 1024  # hashed when listed; bigger files are hashed when loaded (as A1111 does)


class ModelIndex:
    """The checkpoints a client may choose from, by title, file name, name or hash: never by path. The same index
    serves the local worker (`scan`) and the Ray Serve ingress (`from_records`, the replicas' index)."""

    def __init__(self, entries=(), refresher=None):
        self.entries: list[ModelEntry] = list(entries)
        self._refresher = refresher  # () -> the entries found now

    @classmethod
    def scan(cls, ckpt: str | None, ckpt_dir: str | None) -> ModelIndex:
        index = cls(refresher=lambda: _scan(ckpt, ckpt_dir, index.entries))
        index.refresh()
        return index

    @classmethod
    def from_records(cls, records: list[dict], refresher=None) -> ModelIndex:
        return cls([ModelEntry(**r) for r in records], refresher)

    def records(self) -> list[dict]:
        return [asdict(e) for e in self.entries]

    def refresh(self):
        if self._refresher is not None:
            self.entries = self._refresher()

    def find(self, name: str) -> ModelEntry | None:
        name = (name or "").strip()
        return next((e for e in self.entries if e.answers_to(name)), None)

    def entry_for(self, path) -> ModelEntry:
        path = str(Path(path).resolve())
        for e in self.entries:
            if e.path == path:
                return e
        e = ModelEntry.of(Path(path))
        self.entries.insert(0, e)
        return e


def _scan(ckpt, ckpt_dir, known: list[ModelEntry]) -> list[ModelEntry]:
    """--ckpt, the checkpoints in --ckpt-dir, the embedded demo model; small files hashed now."""
    from ..checkpoints.hashes import full_sha256
    from ..demo.report import EMBEDDED

    found = [Path(ckpt).resolve()] if ckpt else []
    folder = Path(ckpt_dir).resolve() if ckpt_dir else None
    if folder is not None and folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix in (".safetensors", ".ckpt") and p.is_file() or (p / "model_index.json").is_file():
                found.append(p.resolve())
    if EMBEDDED.exists():
        found.append(EMBEDDED)
    old = {e.path: e for e in known}
    entries = []
    for p in dict.fromkeys(found):
        e = old.get(str(p)) or ModelEntry.of(p)
        if e.sha256 is None and p.is_file() and p.stat().st_size <= SMALL_FILE:
            e.sha256 = full_sha256(p)
        entries.append(e)
    return entries
