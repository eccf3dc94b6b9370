"""The codebase's shape, checked: the import graph has no circle and no arrow back up (scripts/import_graph.py,
imports inside functions included), and no function outside kernels/ is longer than a screen."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60  # kernels/ is exempt: a Triton kernel body is one function by construction


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its signature and docstring not counted (ruff format puts one argument a line)."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_circle_and_no_arrow_back_up(capsys):
    assert _import_graph().main(["--inner"]) == 0, capsys.readouterr().out


def test_the_checker_sees_a_circle_and_an_arrow_back_up():
    ig = _import_graph()
    g = {
        "pipeline.model.pill": {"pipeline.training.loop"},
        "pipeline.training.loop": {"pipeline.model.pill"},
        "pipeline.data.collate": {"pipeline.eval.mme"},
        "pipeline.eval.mme": set(),
    }
    assert ig.circles(g) == [["pipeline.model.pill", "pipeline.training.loop"]]
    assert ("pipeline.data.collate", "pipeline.eval.mme") in ig.up_arrows(g)
    assert ig.floor("pipeline.model.seq") < ig.floor("pipeline.model.pill") < ig.floor("pipeline.model.methods")


def test_body_lines_skip_signature_and_docstring():
    fn = ast.parse('def f(\n    a,\n    b,\n):\n    """Doc."""\n    x = a\n    return x + b\n').body[0]
    assert body_lines(fn) == 2


def test_no_function_longer_than_a_screen():
    long = []
    for folder in ("pipeline", "shards", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = body_lines(node)
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
