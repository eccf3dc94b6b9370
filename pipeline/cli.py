"""One-line errors for the command-line tools: a bad argument (a file that is not there or not what it should
be, a malformed value) ends with `error: <message naming the file or flag>` and exit 2, like argparse's own usage
errors, instead of a traceback. PILL_TRACEBACK=1 shows the traceback too (for bug reports).

Each tool's `if __name__ == "__main__": raise SystemExit(run_cli(main))`; main(argv) itself still raises, so
tests and callers see the exception."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
EXIT_USAGE = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit code; a user error (USER_ERRORS) as one line on stderr and EXIT_USAGE."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        if os.environ.get("PILL_TRACEBACK"):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "error"
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
