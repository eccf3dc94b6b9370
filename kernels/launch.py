"""One place where the launchers start Triton kernels, so a launch can be recorded instead of run.

The compile report (``kernels/compile_report.py``) calls the real launchers on ``meta`` tensors of the headline
shapes inside ``capture()``: it gets exactly the kernels, constexprs, launch options and grids the launchers
would pick on a GPU, without a GPU and without duplicating the launchers' choices.

Under TRITON_INTERPRET=1 the first launch also checks the interpreter against numpy: Triton 3.6's interpreter
turns a loop bound into a Python int with ``int(handle.data)`` on a 1-element array, which numpy >= 2.4 refuses
(``TypeError: only 0-dimensional arrays can be converted to Python scalars``, triton-lang/triton#9171, fixed by
``.squeeze()`` in later Tritons, 3.9 included). Every kernel here loops over runtime bounds (KV blocks, d-tiles,
token blocks), so that cannot be avoided in our code: the bound is numpy < 2.4 for that interpreter, raised here
by name instead of as an InterpreterError inside the first kernel. Compiled (GPU) launches do not touch numpy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
from triton.runtime import _allocation


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
    if os.environ.get("TRITON_INTERPRET") == "1":
        check_interpreter_numpy()
    kernel[grid](*args, **kwargs)


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # torch's caching allocator returns 512-byte-aligned blocks on the current stream (and works under graph capture)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give Triton a global-memory allocator where none is set, for kernels that build TMA descriptors on the
    device (each program writes its descriptors to a scratch slot). Triton keeps the allocator in a ContextVar:
    a thread that never set one (autograd's device threads, where activation checkpointing re-runs the forward)
    sees the raising default, so the launchers call this before every such launch on a GPU; it never replaces a
    user's allocator."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def interpreter_needs_old_numpy() -> bool:
    """True when the installed Triton's interpreter converts loop bounds with ``int(handle.data)`` on a
    1-element array (Triton 3.6), which numpy >= 2.4 refuses; later Tritons squeeze first."""
    from triton.runtime import interpreter

    try:
        src = inspect.getsource(interpreter._patch_lang_tensor)
    except (AttributeError, OSError, TypeError):  # a layout we do not know: assume it is fixed
        return False
    return "int(self.handle.data)" in src


@functools.cache
def check_interpreter_numpy() -> None:
    """Raise, naming the fix, where the Triton interpreter cannot run our kernels with the installed numpy."""
    if tuple(int(part) for part in np.__version__.split(".")[:2]) < (2, 4):
        return
    if interpreter_needs_old_numpy():
        raise RuntimeError(
            f"the Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) needs numpy < 2.4 "
            f"(found {np.__version__}; triton-lang/triton#9171): pip install 'numpy<2.4', or a "
            "newer Triton (3.9 works with numpy 2.4)"
        )


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
