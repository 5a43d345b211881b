"""Size limits that keep kiln readable: no function over 80 lines, no module over 600, and the class that holds a
loaded model (`kiln.pipeline.model.Pipeline`) under 250. Static web files are not Python and not counted."""
import ast
from pathlib import Path

import pytest

KILN = Path(__file__).resolve().parent.parent / "kiln"
MAX_FUNCTION, MAX_MODULE, MAX_MODEL_CLASS = 80, 600, 250


def too_long(path: Path, source: str) -> list[str]:
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE:
        found.append(f"{path}: {lines} lines (at most {MAX_MODULE})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION:
                found.append(f"{path}:{node.lineno}: {node.name} has {n} lines (at most {MAX_FUNCTION})")
    return found


def test_no_function_or_module_is_too_long():
    found = [f for p in sorted(KILN.rglob("*.py")) for f in too_long(p.relative_to(KILN.parent), p.read_text())]
    assert not found, "\n".join(found)


def test_the_class_that_holds_a_model_is_small():
    tree = ast.parse((KILN / "pipeline" / "model.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pipeline")
    assert cls.end_lineno - cls.lineno + 1 < MAX_MODEL_CLASS


@pytest.mark.parametrize("body,limit", [("    x = 1\n" * 79, 0), ("    x = 1\n" * 80, 1)])  # + the def line
def test_the_check_counts_a_function_s_lines(body, limit):
    assert len(too_long(Path("x.py"), "def f():\n" + body)) == limit
