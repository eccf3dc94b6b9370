"""`pill-eval scienceqa ...` / `pill-eval mme ...`: the console-script form of `python -m pipeline.eval.<task>`."""

from __future__ import annotations

import importlib
import sys

from pipeline.cli import run_cli

TASKS = {"scienceqa": "pipeline.eval.scienceqa", "mme": "pipeline.eval.mme"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TASKS:
        print(
            f"usage: pill-eval {{{','.join(TASKS)}}} [options]  (pill-eval <task> --help for the options)",
            file=sys.stderr,
        )
        return 2
    return run_cli(importlib.import_module(TASKS[argv[0]]).main, argv[1:])  # a bad argument: one line, exit 2


if __name__ == "__main__":
    raise SystemExit(main())
