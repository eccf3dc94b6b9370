"""Both kernels as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` captures them as single
graph nodes (fake implementations give the output shapes, ``register_autograd`` the gradients).

The op namespace is this package's import name (``pill_kernels`` installed, ``kernels`` from the repository root):
a process that imports the folder under both names registers two independent sets of ops instead of colliding.

Each op runs the Triton path where the module would (CUDA, or the interpreter under TRITON_INTERPRET=1) and the
PyTorch reference otherwise; the reference backward recomputes the reference under autograd.
"""

import importlib

import torch

NS = __name__.split(".")[0]
# modules, not the package attributes of the same names (those are the functions); the attention ops live
# beside their kernel in gated_attention.py
_ra = importlib.import_module(f"{__package__}.routed_adapter")


# --------------------------------------------------------------------------------------------------- adapter
@torch.library.custom_op(f"{NS}::routed_swiglu_adapter_fwd", mutates_args=())
def routed_swiglu_adapter_fwd(
    x: torch.Tensor,
    route: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w_gate: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y like x, the pre-activations hg | hd (N, 2r) fp32; empty on the reference path). perm / offs: the
    RouteSchedule of ``route``."""
    _ra._check(x, route, w_gate, w_down, w_up)
    if not _ra._use_triton(x):
        y = _ra.routed_swiglu_adapter_ref(x, route, w_gate, w_down, w_up).contiguous()
        return y, x.new_empty((0,), dtype=torch.float32)
    sched = _ra.RouteSchedule(route, perm, offs, w_gate.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_cat, w_ut = _ra._weights(w_gate, w_down, w_up, torch.float32 if _ra._flags(x2)["COMPUTE_F32"] else x.dtype)
    y, h = _ra._forward(x2, sched, w_cat, w_ut)
    return y.view(x.shape), h


@routed_swiglu_adapter_fwd.register_fake
def _(x, route, perm, offs, w_gate, w_down, w_up):
    n = x.numel() // x.shape[-1]
    h_shape = (n, 2 * w_gate.shape[1]) if _ra._use_triton(x) else (0,)
    return x.new_empty(x.shape), x.new_empty(h_shape, dtype=torch.float32)


@torch.library.custom_op(f"{NS}::routed_swiglu_adapter_bwd", mutates_args=())
def routed_swiglu_adapter_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    route: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w_gate: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    h: torch.Tensor,
) -> list[torch.Tensor]:
    """-> [dx, dw_gate, dw_down, dw_up]."""
    if not _ra._use_triton(x):
        leaves = [t.detach().requires_grad_() for t in (x, w_gate, w_down, w_up)]
        with torch.enable_grad():
            ref = _ra.routed_swiglu_adapter_ref(leaves[0], route, *leaves[1:])
            return [t.contiguous() for t in torch.autograd.grad(ref, leaves, dy)]
    sched = _ra.RouteSchedule(route, perm, offs, w_gate.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_cat, w_ut = _ra._weights(w_gate, w_down, w_up, torch.float32 if _ra._flags(x2)["COMPUTE_F32"] else x.dtype)
    dx, dwg, dwd, dwu = _ra._backward(dy.reshape(x2.shape).contiguous(), x2, sched, w_cat, w_ut, h)
    return [dx.view(x.shape), dwg.to(w_gate.dtype), dwd.to(w_down.dtype), dwu.to(w_up.dtype)]


@routed_swiglu_adapter_bwd.register_fake
def _(dy, x, route, perm, offs, w_gate, w_down, w_up, h):
    return [
        x.new_empty(x.shape),
        w_gate.new_empty(w_gate.shape),
        w_down.new_empty(w_down.shape),
        w_up.new_empty(w_up.shape),
    ]


def _adapter_setup(ctx, inputs, output):
    x, route, perm, offs, w_gate, w_down, w_up = inputs
    ctx.save_for_backward(x, route, perm, offs, w_gate, w_down, w_up, output[1])


def _adapter_backward(ctx, dy, _dh):
    x, route, perm, offs, w_gate, w_down, w_up, h = ctx.saved_tensors
    dx, dwg, dwd, dwu = routed_swiglu_adapter_bwd(dy.contiguous(), x, route, perm, offs, w_gate, w_down, w_up, h)
    return dx, None, None, None, dwg, dwd, dwu


routed_swiglu_adapter_fwd.register_autograd(_adapter_backward, setup_context=_adapter_setup)
