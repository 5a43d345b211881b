"""Where kiln keeps what it makes once and reuses (bench weights, peer venvs, compiled OpenVINO models):
$KILN_CACHE, by default ~/.cache/kiln. Torch-free: the peers benchmark's own venvs import it."""
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$KILN_CACHE (default ~/.cache/kiln) joined with `parts`; nothing is created."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")).joinpath(*parts)
