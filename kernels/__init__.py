"""Triton kernels for PILL, each with a PyTorch reference and an autograd.Function.

Backend switch (per call): Triton when the tensors are on CUDA, or when TRITON_INTERPRET=1 was set before import
(CPU interpreter, slow, for tests); otherwise the PyTorch reference.

`kernels` is also the import name of an unrelated PyPI package that transformers probes for
(`is_kernels_available`). Installed, this package belongs to the `pill-train` distribution (version 0.1.0, below
the range transformers accepts), so the probe reads that metadata and reports the package absent without
importing it; there is deliberately no `__version__` here for the case where no metadata is found.
"""

from . import ops  # noqa: F401,E402  (registers the torch.library custom ops)
from .gated_attention import GatedAttentionFunction, gated_attention, gated_attention_ref
from .routed_adapter import (
    RoutedSwiGLUAdapterFunction,
    RouteSchedule,
    build_route_schedule,
    routed_swiglu_adapter,
    routed_swiglu_adapter_eager,
    routed_swiglu_adapter_ref,
)

__all__ = [
    "GatedAttentionFunction",
    "RouteSchedule",
    "RoutedSwiGLUAdapterFunction",
    "build_route_schedule",
    "gated_attention",
    "gated_attention_ref",
    "routed_swiglu_adapter",
    "routed_swiglu_adapter_eager",
    "routed_swiglu_adapter_ref",
]
