"""One place where the launchers start Triton kernels, so a launch can be recorded instead of run.

The compile report (``kernels/compile_report.py``) calls the real launchers on ``meta`` tensors of the headline
shapes inside ``capture()``: it gets exactly the kernels, constexprs, launch options and grids the launchers
would pick on a GPU, without a GPU and without duplicating the launchers' choices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Launch:
    """A recorded kernel launch: the JIT function, its grid, positional args and keyword args (constexprs and
    the num_warps / num_stages options)."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)
    tag: str = ""


_CAPTURED: list[Launch] | None = None


def launch(kernel, grid: tuple, *args, tag: str = "", **kwargs) -> None:
    """Run ``kernel[grid](*args, **kwargs)``, or record it while ``capture()`` is active."""
    if _CAPTURED is not None:
        _CAPTURED.append(Launch(kernel, tuple(grid), args, kwargs, tag or kernel.__name__))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record launches instead of running them (not thread-safe; for the compile report)."""
    global _CAPTURED
    prev, _CAPTURED = _CAPTURED, []
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = prev


def on_gpu(device) -> bool:
    """Launch configuration for a GPU: CUDA tensors, or ``meta`` tensors when the compile report plans a GPU
    launch. CPU tensors mean the Triton interpreter (tiny tiles)."""
    return device.type != "cpu"
