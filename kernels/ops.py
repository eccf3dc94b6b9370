"""Both kernels as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` captures them as single
graph nodes (fake implementations give the output shapes, ``register_autograd`` the gradients).

The op namespace is this package's import name (``pill_kernels`` installed, ``kernels`` from the repository root):
a process that imports the folder under both names registers two independent sets of ops instead of colliding.

Each op lives beside its kernels (attention/op.py, routed_adapter.py); this module names them all in one
place. Each op runs the Triton path where the module would (CUDA, or the interpreter under
TRITON_INTERPRET=1) and the PyTorch reference otherwise; the reference backward recomputes the reference under
autograd.
"""

from .attention import gated_attention_bwd, gated_attention_decode, gated_attention_fwd
from .routed_adapter import routed_swiglu_adapter_bwd, routed_swiglu_adapter_fwd

__all__ = [
    "gated_attention_fwd",
    "gated_attention_bwd",
    "gated_attention_decode",
    "routed_swiglu_adapter_fwd",
    "routed_swiglu_adapter_bwd",
]
