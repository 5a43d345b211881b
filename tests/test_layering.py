"""Imports inside kiln go down the layers only: a static `ast` scan of every .py file under kiln/ (imports inside
functions included, relative imports resolved), so that the generation core never comes to depend on its front ends.

A module is keyed by its top-level name under kiln: `kiln/pipeline.py`, `kiln/pipeline/__init__.py` and
`kiln/pipeline/text.py` are all "pipeline"; `kiln/__init__.py` (the package root, the public API) is "kiln"."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = "kiln"  # the key of kiln/__init__.py
KILN = Path(__file__).resolve().parent.parent / "kiln"

# The layers, lowest first: a module may import its own layer and the layers below it.
LAYERS = [
    # (level, top-level names, why they sit there)
    (0, {"errors", "cache", "models", "tokenizer", "prompts", "samplers", "tiling", "images", "upscalers", "styles",
         "preprocessors"},
     "base: exceptions, the cache folder, torch modules, tokenizer, prompt parsing and styles, samplers, tiling, "
     "image helpers, ControlNet preprocessors"),
    (1, {"checkpoints"}, "reads weight files into the models"),
    (2, {"pipeline", "offload"}, "the generation core: checkpoints, models and samplers put together"),
    (3, {"output", "scripts"}, "what becomes of finished images (PNG metadata, grids, file naming, the atomic "
     "writer), and A1111's scripts: many generations, their labelled grids"),
    (4, {"demo"}, "the demo model's trainer, analyzer and report, which drive the pipeline"),
    (5, {"server", "distributed", "bench", "bench_peers", "compat", "cli", ROOT},
     "front ends; kiln/__init__.py is the public API"),
]
FRONT_END_LEVEL = 5

# Front ends import no front end, except these (importer, imported; "*": any front end), and why.
FRONT_END_EXCEPTIONS = {
    ("cli", "*"): "cli is the command dispatcher: its subcommands start the other front ends",
    ("distributed", "server"): "Ray Serve wraps the HTTP server (its app and worker)",
    ("bench_peers", "bench"): "the peers benchmark reuses kiln bench's weights file and its diffusers pipeline",
}

# Names of the package root that any module may import (`from kiln import __version__`, `from .. import __version__`).
ROOT_NAMES_FOR_ALL = {
    "__version__": "the package's version constant (infotexts, /info, --version): data, not the public API",
}

# Violations in the tree, to be fixed, as (importer's top-level name, imported module), so that an entry survives the
# importer's move within its package. Any violation not listed fails; so does an entry that no longer occurs (delete
# it then).
KNOWN: set[tuple[str, str]] = set()

LEVEL = {name: level for level, names, _ in LAYERS for name in names}


def module_name(rel: Path) -> str:
    """`kiln/pipeline/text.py` -> "kiln.pipeline.text"; `kiln/pipeline/__init__.py` -> "kiln.pipeline"."""
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_key(module: str) -> str:
    """"kiln" -> "kiln" (the package root); "kiln.pipeline.text" -> "pipeline"."""
    parts = module.split(".")
    return ROOT if len(parts) == 1 else parts[1]


def imports_of(rel: Path, source: str, modules: set[str]) -> list[tuple[int, str, str | None]]:
    """(line, imported kiln module, name taken from the package root or None) for every import of a kiln module in
    `source`, the file `rel` (relative to the repository, e.g. kiln/models/x.py). `modules` are the known dotted module
    names, which tell `from kiln import pipeline` (a module) from `from kiln import load` (a name of the root)."""
    name = module_name(rel)
    package = name if rel.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, str(rel))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "kiln"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    raise AssertionError(f"{rel}:{node.lineno}: a relative import above the kiln package")
                base = ".".join(base[: len(base) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            if target.split(".")[0] != "kiln":
                continue
            for a in node.names:
                if f"{target}.{a.name}" in modules:  # `from kiln import pipeline`, `from . import shapes`
                    item = (node.lineno, f"{target}.{a.name}", None)
                else:
                    item = (node.lineno, target, a.name if target == ROOT else None)
                if item not in found:  # `from .x import a, b`: once
                    found.append(item)
    return sorted(found, key=lambda item: item[0])


def known_modules(files) -> set[str]:
    """The dotted names of `files` and of every package above them (a folder without __init__.py too)."""
    out = set()
    for rel in files:
        parts = module_name(rel).split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def check(files: dict[Path, str]) -> list[tuple[str, str, str]]:
    """Every layering violation in `files` (path relative to the repository -> source), as (importer's top-level
    name, imported module, message); a file or an imported module that maps to no layer is one too."""
    modules = known_modules(files) | {f"kiln.{name}" for name in LEVEL if name != ROOT}
    out = []
    for rel, source in sorted(files.items()):
        key = layer_key(module_name(rel))
        if key not in LEVEL:
            out.append((key, "", f"{rel.as_posix()}: '{key}' is in no layer (add it to LAYERS)"))
            continue
        for line, target, root_name in imports_of(rel, source, modules):
            other = layer_key(target)
            if other == key or root_name in ROOT_NAMES_FOR_ALL:
                continue
            where = f"{rel.as_posix()}:{line}: {key} ({LEVEL[key]}) -> {target}"
            if other not in LEVEL:
                out.append((key, target, f"{where}: '{other}' is in no layer"))
            elif LEVEL[other] > LEVEL[key]:
                out.append((key, target, f"{where}: {other} ({LEVEL[other]}) is a higher layer"))
            elif (LEVEL[other] == FRONT_END_LEVEL and (key, other) not in FRONT_END_EXCEPTIONS
                  and (key, "*") not in FRONT_END_EXCEPTIONS):
                out.append((key, target, f"{where}: {other} ({LEVEL[other]}) is a front end"))
    return out


def tree() -> dict[Path, str]:
    repo = KILN.parent
    return {p.relative_to(repo): p.read_text(encoding="utf-8") for p in sorted(KILN.rglob("*.py"))}


def test_imports_go_down_the_layers():
    found = check(tree())
    new = [msg for importer, target, msg in found if (importer, target) not in KNOWN]
    assert not new, f"{len(new)} imports against the layers (see LAYERS in {Path(__file__).name}):\n" + "\n".join(new)


def test_kiln_imports_name_existing_modules():
    """The scan resolves relative imports itself: one that names no module under kiln/ (a file moved into a package
    without its `.` becoming `..`) would otherwise hide what it imports from the layer check."""
    files = tree()
    modules = known_modules(files)
    missing = [f"{rel.as_posix()}:{line}: {target}" for rel, source in files.items()
               for line, target, _ in imports_of(rel, source, modules) if target not in modules]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_known_violations_still_occur():
    """KNOWN shrinks as violations are fixed: an entry that no longer occurs must go."""
    found = {(importer, target) for importer, target, _ in check(tree())}
    stale = sorted(set(KNOWN) - found)  # set(): an emptied `KNOWN = {}` is a dict
    assert not stale, "no longer violations, delete them from KNOWN:\n" + "\n".join(f"{i} -> {t}" for i, t in stale)


def test_every_file_under_kiln_has_a_layer():
    files = tree()
    assert Path("kiln/__init__.py") in files and len(files) > 20  # the scan sees the package
    unplaced = sorted({layer_key(module_name(rel)) for rel in files} - set(LEVEL))
    assert not unplaced, f"top-level modules in no layer (add them to LAYERS): {unplaced}"


def test_layers_and_exceptions_are_consistent():
    names = [name for _, group, _ in LAYERS for name in group]
    assert len(names) == len(set(names)), "a name in two layers"
    assert [level for level, _, _ in LAYERS] == sorted(level for level, _, _ in LAYERS)
    for importer, imported in FRONT_END_EXCEPTIONS:
        assert LEVEL[importer] == FRONT_END_LEVEL and (imported == "*" or LEVEL[imported] == FRONT_END_LEVEL)


@pytest.mark.parametrize("rel,source,target", [
    ("kiln/models/x.py", "from ..pipeline import load\n", "kiln.pipeline"),
    ("kiln/models/x.py", "def f():\n    import kiln.pipeline.text as t\n", "kiln.pipeline.text"),
    ("kiln/models/__init__.py", "from ..checkpoints import load_model\n", "kiln.checkpoints"),
    ("kiln/samplers/run.py", "from kiln import load\n", "kiln"),
    ("kiln/samplers/run.py", "import kiln\n", "kiln"),
    ("kiln/output/pnginfo.py", "from .. import __version__, load\n", "kiln"),
    ("kiln/output/infotext.py", "from ..demo.report import EMBEDDED\n", "kiln.demo.report"),
    ("kiln/pipeline/__init__.py", "from ..output.pnginfo import png_bytes\n", "kiln.output.pnginfo"),
    ("kiln/pipeline.py", "from . import server\n", "kiln.server"),
    ("kiln/bench.py", "from .pipeline import load\nfrom .compat import run\n", "kiln.compat"),
    ("kiln/server/app.py", "from ..distributed import serve\n", "kiln.distributed"),  # serve: not a scanned file
    ("kiln/__init__.py", "from .server import app\n", "kiln.server"),
])
def test_checker_reports_an_upward_import(rel, source, target):
    found = check({Path(rel): source})
    assert [t for _, t, _ in found] == [target], found
    assert found[0][0] == layer_key(module_name(Path(rel))) and found[0][2].startswith(f"{rel}:")


@pytest.mark.parametrize("rel,source", [
    ("kiln/pipeline/infotext.py", "from .. import __version__\n"),
    ("kiln/models/x.py", "from kiln import __version__\nfrom ..errors import KilnError\n"),
    ("kiln/pipeline/text.py", "from ..checkpoints.embeddings import scan\nfrom . import noise\n"
                              "from ..models import sd\nfrom ..tiling import tiled_cover\n"),
    ("kiln/pipeline.py", "from .samplers import parse\nfrom .offload import Offloader\n"),
    ("kiln/demo/train.py", "from . import shapes\nfrom ..output import OutputDir\nfrom ..pipeline import load\n"),
    ("kiln/cli.py", "from .server.app import serve\nfrom .distributed.batch import run_batch\nfrom . import bench\n"),
    ("kiln/distributed/serve.py", "from ..server.worker import Worker\n"),
    ("kiln/__init__.py", "def load():\n    from .pipeline import load\n"),
])
def test_checker_allows_imports_down_and_the_exceptions(rel, source):
    assert check({Path(rel): source}) == []


def test_checker_reports_a_file_in_no_layer():
    found = check({Path("kiln/newthing.py"): "from .errors import KilnError\n"})
    assert len(found) == 1 and "'newthing' is in no layer" in found[0][2]
