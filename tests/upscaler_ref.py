"""spandrel (PyPI, test-only) as the oracle of the upscaler tests: its architectures load the same files and run.

`import spandrel` runs its package __init__, which imports its main registry and so every architecture it has; two
(LaMa, RestoreFormer) import torchvision, and PyPI's torchvision does not import beside the CPU torch kiln's CI
installs. So instead of faking torchvision, this module registers the `spandrel` package object without executing its
__init__ (importlib.util.module_from_spec alone), then imports only the four architecture subpackages kiln compares
against; their own imports (spandrel.util, spandrel.__helpers.*, einops, numpy) are real. Nothing else in the test
process imports spandrel, so the bare package object is seen by these helpers only."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ARCHS = {"ESRGAN": "ESRGANArch", "Compact": "CompactArch", "SwinIR": "SwinIRArch", "DAT": "DATArch"}


def spandrel_module(name: str):
    """`spandrel.<name>`, imported without spandrel's package __init__ (see above)."""
    if "spandrel" not in sys.modules:
        spec = importlib.util.find_spec("spandrel")
        if spec is None:
            pytest.skip("spandrel is not installed (pip install --no-deps spandrel einops)")
        sys.modules["spandrel"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"spandrel.{name}")


def arch(name: str):
    """spandrel's Architecture object (its detection and loader) for ESRGAN, Compact, SwinIR or DAT."""
    return getattr(spandrel_module(f"architectures.{name}"), ARCHS[name])()


def network(name: str, **hyper):
    """spandrel's network class of an architecture, built with `hyper` (used to write files in its own layout)."""
    module = spandrel_module(f"architectures.{name}")
    cls = {"ESRGAN": "ESRGAN", "Compact": "Compact", "SwinIR": "SwinIR", "DAT": "DAT"}[name]
    return getattr(module, cls)(**hyper)


def read(path) -> dict:
    """The file as spandrel's loader reads it (a trusted test file: torch.load with weights_only)."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def spandrel_load(path, expect: str):
    """spandrel's model descriptor for the file, by its own canonicalisation and detection (`expect` must claim it)."""
    canonical = spandrel_module("__helpers.canonicalize").canonicalize_state_dict(read(path))
    claims = [a for a in ARCHS if arch(a).detect(canonical)]
    assert expect in claims, f"spandrel does not detect {expect} in {path} (claims: {claims})"
    return arch(expect).load(canonical)


def spandrel_run(desc, x: torch.Tensor) -> torch.Tensor:
    """What spandrel's descriptor call returns, without its final clamp to [0, 1] (so that kiln's unclamped values are
    compared too): the input padded to its size requirements, the network, the padding cropped."""
    h, w = x.shape[-2:]
    padded, x = spandrel_module("__helpers.size_req").pad_tensor(x, desc.size_requirements)
    with torch.no_grad():
        y = desc.model.eval()(x)
    return y[..., : h * desc.scale, : w * desc.scale]


def save(state: dict, path, wrapper: str | None = None):
    """Write `state` as .safetensors or .pth (inside {wrapper: state} when given, as BasicSR's trainer writes it)."""
    state = {k: v.contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({wrapper: state} if wrapper else state, path)
    return path
