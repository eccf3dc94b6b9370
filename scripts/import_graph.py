"""The project's module import graph: `python scripts/import_graph.py [--edges] [--inner]`.

Reads every module of `pipeline`, `shards` and `pill_kernels` (the repo folder `kernels/`) with `ast`, takes each
import of a project module (at module top, and with --inner the ones inside functions too), and prints the
import circles (strongly connected components with more than one module) and the arrows that climb back up: an
import from a module to one on a higher floor (FLOORS below). Exit status 1 when either exists.

Floors, lowest first: what a module may import sits on its own floor or below.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pipeline": "pipeline", "shards": "shards", "pill_kernels": "kernels"}
FLOORS: list[tuple[str, ...]] = [
    # the kernels, bottom up: the launch recorder and the per-step weight cache; the attention package's shared
    # helpers and tile tables; its phases and reference; its custom ops; the ops' public names
    ("pill_kernels.launch", "pill_kernels.weight_cache"),
    ("pill_kernels.attention.common", "pill_kernels.attention.tiles"),
    (
        "pill_kernels.attention.forward",
        "pill_kernels.attention.decode",
        "pill_kernels.attention.backward",
        "pill_kernels.attention.reference",
    ),
    ("pill_kernels.attention.op",),
    ("pill_kernels.attention", "pill_kernels.routed_adapter"),
    ("pill_kernels.ops",),
    ("pipeline.constants", "pipeline.cli", "pipeline.launch", "pill_kernels"),
    # the model package, bottom up: frozen-part building blocks, the shared skeleton, the loaders, the methods,
    # the method table, the package's public names
    (
        "pipeline.model.adapters",
        "pipeline.model.attention",
        "pipeline.model.batch",
        "pipeline.model.backends",
        "pipeline.model.lavis",
        "pipeline.model.clip",
    ),
    ("pipeline.model.vpg", "pipeline.model.base", "pipeline.model.seq"),
    ("pipeline.model.config", "pipeline.model.tiny", "pipeline.model.gguf", "pipeline.model.block"),
    ("pipeline.model.frozen",),
    ("pipeline.model.pill", "pipeline.model.peers"),
    ("pipeline.model.methods",),
    ("pipeline.model",),
    ("pipeline.data", "shards"),
    ("pipeline.memory", "pipeline.generate"),
    # shards.replay answers prompts with the frozen LLM through the evaluation's generation helper
    ("pipeline.eval", "pipeline.report", "shards.replay"),
    ("pipeline.training", "pipeline.bench", "pipeline.params"),
    # the server answers with pipeline.generate's batched decoding
    ("pipeline.serve",),
    ("pipeline.train", "pipeline"),
]


def floor(module: str) -> int:
    best, depth = len(FLOORS), -1
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    return best


def modules() -> Iterator[tuple[str, Path]]:
    for name, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [name, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports(module: str, path: Path, inner: bool, known: set[str]) -> set[str]:
    """Project modules `module` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    nodes = ast.walk(tree) if inner else _top_level(tree)
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for n in names:
            target = _known_prefix(n, known)
            if target and target != module:
                out.add(target)
    return out


def _top_level(tree: ast.Module) -> Iterator[ast.AST]:
    """Imports executed at import time: module body, including under if/try (not inside def or class bodies)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(
                node.body
                + node.orelse
                + getattr(node, "finalbody", [])
                + [s for h in getattr(node, "handlers", []) for s in h.body]
            )


def _known_prefix(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph(inner: bool) -> dict[str, set[str]]:
    mods = dict(modules())
    known = set(mods)
    return {m: imports(m, p, inner, known) for m, p in mods.items()}


def up_arrows(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (a, b) for a, targets in g.items() for b in targets if floor(b) > floor(a) and not a.startswith(b + ".")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", action="store_true", help="print every module with what it imports")
    ap.add_argument("--inner", action="store_true", help="count imports inside functions too")
    args = ap.parse_args(argv)
    g = graph(args.inner)
    if args.edges:
        for m in sorted(g):
            print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
    cyc, up = circles(g), up_arrows(g)
    print(
        f"{len(g)} modules, {sum(map(len, g.values()))} imports ({'all' if args.inner else 'module top'}); "
        f"{len(cyc)} circle(s), {len(up)} arrow(s) back up"
    )
    for c in cyc:
        print("circle: " + " <-> ".join(c))
    for a, b in up:
        print(f"up: {a} (floor {floor(a)}) -> {b} (floor {floor(b)})")
    return 1 if cyc or up else 0


if __name__ == "__main__":
    raise SystemExit(main())
