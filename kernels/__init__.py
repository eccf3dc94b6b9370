"""Triton kernels for PILL, each a ``torch.library`` custom op (fake implementation and autograd registered, so
``torch.compile(fullgraph=True)`` captures it as one graph node) with a public function and a PyTorch reference:

- ``gated_attention`` / ``gated_attention_ref`` (the ``attention`` package, split by phase);
- ``routed_swiglu_adapter`` / ``routed_swiglu_adapter_ref`` (``routed_adapter.py``), with ``build_route_schedule``;
- ``weight_cache``: the compute-dtype / stacked weight copies made once per optimizer step.

Backend switch (per call): Triton when the tensors are on CUDA, or when TRITON_INTERPRET=1 was set before import
(CPU interpreter, slow, for tests); otherwise the PyTorch reference.

`kernels` is also the import name of an unrelated PyPI package that transformers probes for
(`is_kernels_available`). Installed, this package belongs to the `pill-train` distribution (version 0.1.0, below
the range transformers accepts), so the probe reads that metadata and reports the package absent without
importing it; there is deliberately no `__version__` here for the case where no metadata is found.
"""

from . import ops  # noqa: F401,E402  (registers the torch.library custom ops)
from .attention import gated_attention, gated_attention_ref
from .routed_adapter import (
    RouteSchedule,
    build_route_schedule,
    routed_swiglu_adapter,
    routed_swiglu_adapter_eager,
    routed_swiglu_adapter_ref,
)

__all__ = [
    "RouteSchedule",
    "build_route_schedule",
    "gated_attention",
    "gated_attention_ref",
    "routed_swiglu_adapter",
    "routed_swiglu_adapter_eager",
    "routed_swiglu_adapter_ref",
]
