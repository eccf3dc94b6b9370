"""docs/INTERFACES.md is checked against the code, so it cannot drift from the signatures it documents (and the
```python blocks of README.md and docs/*.md get the same block check).

What is checked, per section of the page:
- every fenced ```python block parses; every `from X import Y` / `import X` in it resolves;
- every call of an imported name, of a variable whose type the block shows (assigned from a constructor or from a
  call with a return annotation) or of such a variable's method binds to the real signature
  (`inspect.Signature.bind`: the documented keyword names exist, no positional argument too many, none missing);
  `with x.m():` and attribute reads on such a variable name something the class has;
- every inline `pipeline.x.y` reference resolves to a module or an attribute, and `Name.attr` for a name imported in
  a block names an attribute or dataclass field of it;
- every repository path in inline code exists; every `--flag` in the training command is one pipeline.train parses;
  the exit codes the page lists are pipeline.train's.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "INTERFACES.md"
REPO_DIRS = ("pipeline/", "kernels/", "shards/", "slurm/", "ds_configs/", "configs/", "docs/", "tests/", "scripts/")


def sections() -> dict[str, str]:
    """{heading: body} of every `## ` section of the page."""
    out: dict[str, str] = {}
    heading = "(top)"
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            out[heading] = ""
        else:
            out[heading] = out.get(heading, "") + line + "\n"
    return out


def python_blocks(body: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def inline_code(body: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", body, flags=re.S))


SECTIONS = sections()
WITH_CODE = [h for h, b in SECTIONS.items() if python_blocks(b)]


# ---- python blocks --------------------------------------------------------------------------------------------------


class _Checker(ast.NodeVisitor):
    """Walks one documented block, keeping the objects its imports name and the types its assignments show."""

    def __init__(self, where: str):
        self.where = where
        self.names: dict[str, Any] = {}
        self.types: dict[str, type] = {}
        self.errors: list[str] = []

    def fail(self, node: ast.AST, msg: str) -> None:
        self.errors.append(f"{self.where} line {getattr(node, 'lineno', '?')}: {msg}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        try:
            mod = importlib.import_module(node.module or "")
        except ImportError as e:
            return self.fail(node, f"`from {node.module} import ...`: {e}")
        for a in node.names:
            if not hasattr(mod, a.name):
                try:  # a submodule
                    self.names[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
                except ImportError:
                    self.fail(node, f"`from {node.module} import {a.name}`: {node.module} has no {a.name}")
                continue
            self.names[a.asname or a.name] = getattr(mod, a.name)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            try:
                importlib.import_module(a.name)
            except ImportError as e:
                self.fail(node, f"`import {a.name}`: {e}")

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        produced = self.result_type(node.value)
        for t in node.targets:
            if isinstance(t, ast.Name) and produced is not None:
                self.types[t.id] = produced

    def visit_Call(self, node: ast.Call) -> None:
        for child in [*node.args, *(k.value for k in node.keywords)]:
            self.visit(child)
        if isinstance(node.func, ast.Attribute):
            self.visit(node.func)  # `model.missing()`: the attribute is named
        target = self.callable_of(node.func)
        if target is None:
            return
        fn, bound_self, label = target
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        if any(k.arg in (KW_ONLY, RETURNS) for k in node.keywords):
            return self.check_signature(node, sig, bound_self, label)
        args = [object()] * (len(node.args) + bound_self)
        kwargs = {k.arg: object() for k in node.keywords if k.arg is not None}
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return  # *args / **kwargs in the doc: nothing to bind
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            self.fail(node, f"`{label}(...)`: {e}; the signature is {sig}")

    def check_signature(self, node: ast.Call, sig: inspect.Signature, bound_self: int, label: str) -> None:
        """A call written as a signature (`f(a, b=None, *, c=True)`): the same parameters, in order, of the same
        kinds, with the same literal defaults."""
        params = list(sig.parameters.values())[bound_self:]
        documented: list[tuple[str, str, Any]] = []  # (name, kind, default or _NO_DEFAULT)
        kw_only = False
        for a in node.args:
            documented.append((a.id if isinstance(a, ast.Name) else ast.unparse(a), "positional", _NO_DEFAULT))
        for k in node.keywords:
            if k.arg == KW_ONLY:
                kw_only = True
                continue
            if k.arg == RETURNS:
                self.check_return(node, sig, ast.unparse(k.value), label)
                continue
            try:
                default = ast.literal_eval(k.value)
            except ValueError:
                default = _NO_DEFAULT
            documented.append((k.arg, "keyword-only" if kw_only else "positional", default))
        real = [
            (p.name, "keyword-only" if p.kind is p.KEYWORD_ONLY else "positional", p.default)
            for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        shown = [(n, k, "" if d is _NO_DEFAULT else f"={d!r}") for n, k, d in documented]
        actual = [(n, k, "" if d is inspect.Parameter.empty else f"={d!r}") for n, k, d in real]
        if shown != actual:
            self.fail(node, f"`{label}` is documented as {shown} but is {actual}")

    def check_return(self, node: ast.Call, sig: inspect.Signature, shown: str, label: str) -> None:
        real = sig.return_annotation
        real = real if isinstance(real, str) else getattr(real, "__name__", repr(real))
        if real.replace(" ", "") != shown.replace(" ", ""):
            self.fail(node, f"`{label}` is documented to return {shown} but returns {real}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.visit(node.value)
        if isinstance(node.value, ast.Name) and node.value.id in self.types:
            cls = self.types[node.value.id]
            if not has_attribute(cls, node.attr):
                self.fail(node, f"`{node.value.id}.{node.attr}`: {cls.__name__} has no attribute {node.attr!r}")

    def callable_of(self, func: ast.expr) -> tuple[Any, int, str] | None:
        """(the real callable, 1 when `self` is to be bound, its name for messages), or None when unknown."""
        if isinstance(func, ast.Name):
            if func.id in self.names:
                return self.names[func.id], 0, func.id
            if func.id in self.types:  # model(...): the class's forward (nn.Module) or __call__
                cls = self.types[func.id]
                fn = getattr(cls, "forward", None) or cls.__call__
                return fn, 1, f"{func.id} ({cls.__name__}.{fn.__name__})"
            return None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = func.value.id
            if owner in self.types:
                cls = self.types[owner]
                fn = inspect.getattr_static(cls, func.attr, None)
                if fn is None:
                    return None  # visit_Attribute names the missing attribute
                is_static = isinstance(fn, (staticmethod, classmethod))
                return getattr(cls, func.attr), 0 if is_static else 1, f"{cls.__name__}.{func.attr}"
            if owner in self.names and hasattr(self.names[owner], func.attr):
                return getattr(self.names[owner], func.attr), 0, f"{owner}.{func.attr}"
        return None

    def result_type(self, value: ast.expr) -> type | None:
        """The class a documented call returns: a constructor's class, or the callable's return annotation."""
        if not isinstance(value, ast.Call):
            return None
        target = self.callable_of(value.func)
        if target is None:
            return None
        fn = target[0]
        if inspect.isclass(fn):
            return fn
        try:
            ret = typing.get_type_hints(fn).get("return")
        except Exception:  # an annotation naming something the module imports only for type checking
            return None
        return ret if inspect.isclass(ret) else None


def has_attribute(cls: type, name: str) -> bool:
    """A class attribute, a dataclass field, or an instance attribute the class (or a base) sets in its code."""
    if hasattr(cls, name) or (dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}):
        return True
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] not in ("pipeline", "pill_kernels", "kernels", "shards", "tests"):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(name)}\s*(:[^=]*)?=[^=]", src):
            return True
    return False


KW_ONLY = "__keyword_only__"
_NO_DEFAULT = object()


RETURNS = "__returns__"
_BARE_STAR = re.compile(r"([(,]\s*)\*\s*,")


def as_python(block: str) -> str:
    """Signature notation made parseable, line by line: on a line with a bare `*` between arguments or a `->`,
    the `*` becomes a marker keyword, `name: Type` loses its annotation and `) -> Ret` becomes `, __returns__=Ret)`
    (compared with the real return annotation)."""
    out = []
    for line in block.splitlines():
        code, hash_, comment = line.partition("#")
        if _BARE_STAR.search(code) or "->" in code:
            code = _BARE_STAR.sub(rf"\1{KW_ONLY}=0,", code)
            code = re.sub(r"([(,]\s*)(\w+)\s*:\s*[^,=()]+?(?=\s*[,=)])", r"\1\2", code)
            code = re.sub(r"\)\s*->\s*([\w.\[\]| ]+?)\s*$", rf", {RETURNS}=\1)  ", code)
        out.append(code + hash_ + comment)
    return "\n".join(out)


def check_block(block: str, where: str) -> list[str]:
    try:
        tree = ast.parse(as_python(block))
    except SyntaxError as e:
        return [f"{where}: not Python ({e.msg}, line {e.lineno}: {e.text!r})"]
    checker = _Checker(where)
    checker.visit(tree)
    return checker.errors


@pytest.mark.parametrize("heading", WITH_CODE)
def test_python_blocks_match_the_code(heading):
    errors = []
    for i, block in enumerate(python_blocks(SECTIONS[heading])):
        errors += check_block(block, f"docs/INTERFACES.md '{heading}' block {i + 1}")
    assert not errors, "\n".join(errors)


OTHER_DOCS = sorted(
    str(p.relative_to(REPO)) for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")] if p.name != "INTERFACES.md"
)


@pytest.mark.parametrize("doc", [d for d in OTHER_DOCS if python_blocks((REPO / d).read_text())])
def test_python_blocks_of_the_other_docs_match_the_code(doc):
    """README.md and docs/*.md show calls too ("the exact calls in the README"): the same check."""
    errors = []
    for i, block in enumerate(python_blocks((REPO / doc).read_text())):
        errors += check_block(block, f"{doc} block {i + 1}")
    assert not errors, "\n".join(errors)


LOADED = "from pipeline.model import load_pill\nm = load_pill('x')\n"


@pytest.mark.parametrize(
    "block, message",
    [
        ("from pipeline.model import PILLConfigg", "has no PILLConfigg"),
        ("from pipeline.model import PILLConfig\ncfg = PILLConfig(rnak=4)", "unexpected keyword argument 'rnak'"),
        ("from pipeline.model.tiny import build_tiny_llm\nbuild_tiny_llm()", "missing a required argument"),
        (LOADED + "m.gate_magnitudes()", "no attribute 'gate_magnitudes'"),
        (LOADED + "m.save_adapter()", "missing a required argument"),
        (LOADED + "m.tokenizer\nm.tokenzer", "no attribute 'tokenzer'"),
        ("x = (", "not Python"),
        (
            "from pill_kernels import gated_attention\ngated_attention(q, k, v, value_gate=None, *, causal=False)",
            "documented as",
        ),
        (
            "from pipeline.model.tiny import build_tiny_vpg\nbuild_tiny_vpg(out_dir, width=64, *, seed=0)",
            "documented as",
        ),
        ("from pipeline.model.tiny import build_tiny_vpg\nbuild_tiny_vpg(out_dir: str, *, seed=0)", "documented as"),
        (LOADED + "out = m(batch: Batch, *, cache=None, use_cache=False) -> Tensor", "return Tensor but returns"),
    ],
)
def test_the_checker_catches_drift(block, message):
    """The checker itself can fail: each documented mistake is named (and the correct lines pass)."""
    errors = check_block(block, "example")
    assert len(errors) == 1 and message in errors[0], errors


# ---- inline references ----------------------------------------------------------------------------------------------


def imported_names() -> dict[str, Any]:
    names: dict[str, Any] = {}
    for heading in WITH_CODE:
        for block in python_blocks(SECTIONS[heading]):
            checker = _Checker(heading)
            try:
                tree = ast.parse(as_python(block))
            except SyntaxError:
                continue  # test_python_blocks_match_the_code names it
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    checker.visit_ImportFrom(node)
            names.update(checker.names)
    return names


def resolve_dotted(path: str) -> bool:
    """`pipeline.model.image_placeholder_id` -> the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if isinstance(obj, type) and not hasattr(obj, attr) and has_attribute(obj, attr):
                return True
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def inline_errors(code: str, known: dict[str, Any]) -> list[str]:
    errors = []
    for ref in re.findall(r"\b((?:pipeline|pill_kernels|shards)(?:\.\w+)+)", code):
        if not resolve_dotted(ref):
            errors.append(f"`{code}`: {ref} does not resolve")
    for owner, attr in re.findall(r"(?<![\w.])([A-Z]\w*)\.(\w+)", code):
        if owner in known and inspect.isclass(known[owner]) and not has_attribute(known[owner], attr):
            errors.append(f"`{code}`: {owner} has no attribute {attr!r}")
    for path in re.findall(r"(?<![\w/.])((?:" + "|".join(map(re.escape, REPO_DIRS)) + r")[\w./-]*)", code):
        if "*" not in path and not (REPO / path).exists():
            errors.append(f"`{code}`: {path} does not exist in the repository")
    return errors


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_inline_references_resolve(heading):
    known = imported_names()
    errors = [e for code in inline_code(SECTIONS[heading]) for e in inline_errors(code, known)]
    assert not errors, f"docs/INTERFACES.md '{heading}':\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "code, ok",
    [
        ("pipeline.model.image_placeholder_id(tokenizer)", True),
        ("pipeline.model.image_placeholder", False),
        ("pipeline.training.checkpointing", False),
        ("VPG.num_query_tokens", True),
        ("PILLConfig.vpg_width", True),
        ("PILLConfig.vpg_widht", False),
        ("pipeline/train.py", True),
        ("ds_configs/zero4.json", False),
    ],
)
def test_inline_checks_can_fail(code, ok):
    from pipeline.model import VPG, PILLConfig

    errors = inline_errors(code, {"VPG": VPG, "PILLConfig": PILLConfig})
    assert (not errors) is ok, errors


# ---- the training entry point ---------------------------------------------------------------------------------------


def _entry_section() -> str:
    heads = [h for h in SECTIONS if h.lower().startswith("training entry point")]
    assert heads, "docs/INTERFACES.md has no 'Training entry point' section"
    return SECTIONS[heads[0]]


def test_documented_train_flags_exist():
    from pipeline.train import build_parser

    parser = build_parser()
    accepted = {s for a in parser._actions for s in a.option_strings}
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _entry_section()))
    assert flags, "no --flag found in the training entry point section"
    assert not flags - accepted, f"documented but not parsed by pipeline.train: {sorted(flags - accepted)}"


def test_documented_exit_codes_are_the_trainers():
    import pipeline.train as train

    text = " ".join(SECTIONS.get("Training outputs", "").split())
    expected = {"config error": "EXIT_CONFIG", "non-finite": "EXIT_NONFINITE", "preempted": "EXIT_PREEMPTED"}
    for words, const in expected.items():
        m = re.search(rf"\b(\d+) [^,;)]*{words}", text)
        assert m, f"docs/INTERFACES.md 'Training outputs' lists no exit code for {words!r}"
        assert int(m.group(1)) == getattr(train, const), (words, m.group(0), getattr(train, const))


def test_a_true_signature_and_a_true_call_pass():
    block = (
        "from pipeline.model.tiny import build_tiny_vpg\n"
        "build_tiny_vpg(out_dir, *, width=64, num_query_tokens=8, seed=0)\n"
        "build_tiny_vpg(out_dir: str | Path, *, width: int = 64, num_query_tokens: int = 8, seed=0) -> Path\n"
        "vpg_dir = build_tiny_vpg(out_dir, seed=3)\n"
    )
    assert check_block(block, "example") == []
