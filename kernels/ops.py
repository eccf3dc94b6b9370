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
# modules, not the package attributes of the same names (those are the functions)
_ga = importlib.import_module(f"{__package__}.gated_attention")
_ra = importlib.import_module(f"{__package__}.routed_adapter")


# --------------------------------------------------------------------------------------------------- attention
def _attn_prepare(q, k, v, g, cu_seqlens, kv_seqlens, max_seqlen):
    """Flatten to the packed layout the kernels use (as GatedAttentionFunction.forward does)."""
    dev = q.device
    if cu_seqlens is None:
        bsz, t_q, h_q, d = q.shape
        t_k = k.shape[1]
        cu_q = torch.arange(0, (bsz + 1) * t_q, t_q, device=dev, dtype=torch.int32)
        cu_k = torch.arange(0, (bsz + 1) * t_k, t_k, device=dev, dtype=torch.int32)
        max_q, max_k = t_q, t_k
        kv_lens = kv_seqlens.to(device=dev, dtype=torch.int32).contiguous() if kv_seqlens is not None else None
    else:
        cu_q = cu_k = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        if max_seqlen is None:  # one host sync (inside the op, invisible to the compiler)
            max_seqlen = int((cu_q[1:] - cu_q[:-1]).max().item()) if cu_q.numel() > 1 else 0
        max_q = max_k = int(max_seqlen)
        kv_lens = None
    h_q, d = q.shape[-2:]
    h_kv = k.shape[-2]
    g2 = g.reshape(-1, h_q).t().float().contiguous() if g is not None else None
    zero_init = cu_seqlens is not None or kv_lens is not None
    return (q.contiguous().view(-1, h_q, d), k.contiguous().view(-1, h_kv, d), v.contiguous().view(-1, h_kv, d),
            g2, cu_q, cu_k, kv_lens, max_q, max_k, zero_init)


def _triton(t: torch.Tensor) -> bool:
    return _ga._use_triton(t)


@torch.library.custom_op(f"{NS}::gated_attention_fwd", mutates_args=())
def gated_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, value_gate: torch.Tensor | None,
                        cu_seqlens: torch.Tensor | None, kv_seqlens: torch.Tensor | None, causal: bool,
                        max_seqlen: int | None, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out like q, base-2 LSE head-major (Hq, Nq) fp32; empty on the reference path)."""
    _ga._check(q, k, v, value_gate, cu_seqlens, kv_seqlens)
    if not _triton(q):
        out = _ga.gated_attention_ref(q, k, v, value_gate, causal=causal, cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, softmax_scale=softmax_scale, kv_seqlens=kv_seqlens)
        return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, _max_k, zero_init = _attn_prepare(
        q, k, v, value_gate, cu_seqlens, kv_seqlens, max_seqlen)
    if q2.shape[0] == 0 or cu_q.numel() < 2:
        return torch.zeros_like(q), torch.zeros((q.shape[-2], q2.shape[0]), device=q.device)
    o2, lse = _ga._fwd(q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, causal, softmax_scale, zero_init)
    return o2.view(q.shape), lse


@gated_attention_fwd.register_fake
def _(q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale):
    n_q = q.shape[0] * q.shape[1] if cu_seqlens is None else q.shape[0]
    lse_shape = (q.shape[-2], n_q) if _triton(q) else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op(f"{NS}::gated_attention_bwd", mutates_args=())
def gated_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        value_gate: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                        cu_seqlens: torch.Tensor | None, kv_seqlens: torch.Tensor | None, causal: bool,
                        max_seqlen: int | None, softmax_scale: float) -> list[torch.Tensor]:
    """-> [dq, dk, dv] (+ [dgate] when a gate was given)."""
    if not _triton(q):  # reference: recompute under autograd
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if value_gate is not None:
            leaves.append(value_gate.detach().requires_grad_())
        with torch.enable_grad():
            ref = _ga.gated_attention_ref(*leaves[:3], leaves[3] if value_gate is not None else None, causal=causal,
                                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, softmax_scale=softmax_scale,
                                          kv_seqlens=kv_seqlens)
            return [t.contiguous() for t in torch.autograd.grad(ref, leaves, do)]
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, zero_init = _attn_prepare(
        q, k, v, value_gate, cu_seqlens, kv_seqlens, max_seqlen)
    if q2.shape[0] == 0 or cu_q.numel() < 2:
        grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
        return grads + ([torch.zeros_like(value_gate)] if value_gate is not None else [])
    o2 = out.reshape(q2.shape)
    dq, dk, dv, dg = _ga._bwd(do.reshape(q2.shape), q2, k2, v2, g2, o2, lse, cu_q, cu_k, kv_lens, max_q, max_k,
                              causal, softmax_scale, zero_init)
    grads = [dq.view(q.shape), dk.view(k.shape), dv.view(k.shape)]
    if dg is not None:
        grads.append(dg.t().to(value_gate.dtype).contiguous().view(value_gate.shape))
    return grads


@gated_attention_bwd.register_fake
def _(do, q, k, v, value_gate, out, lse, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale):
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    return grads + ([value_gate.new_empty(value_gate.shape)] if value_gate is not None else [])


def _attn_setup(ctx, inputs, output):
    q, k, v, g, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, g, output[0], output[1], cu_seqlens, kv_seqlens)
    ctx.meta = (causal, max_seqlen, softmax_scale, g is not None)


def _attn_backward(ctx, d_out, _d_lse):
    q, k, v, g, out, lse, cu_seqlens, kv_seqlens = ctx.saved_tensors
    causal, max_seqlen, softmax_scale, has_gate = ctx.meta
    grads = gated_attention_bwd(d_out.contiguous(), q, k, v, g, out, lse, cu_seqlens, kv_seqlens, causal,
                                max_seqlen, softmax_scale)
    dg = grads[3] if has_gate else None
    return grads[0], grads[1], grads[2], dg, None, None, None, None, None


gated_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


@torch.library.custom_op(f"{NS}::gated_attention_decode", mutates_args=())
def gated_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, value_gate: torch.Tensor | None,
                           kv_seqlens: torch.Tensor | None, causal: bool, softmax_scale: float) -> torch.Tensor:
    """Forward-only split-KV decode (padded layout, Tq <= DECODE_MAX_Q): generation against a KV cache."""
    _ga._check(q, k, v, value_gate, None, kv_seqlens)
    if not _triton(q):
        return _ga.gated_attention_ref(q, k, v, value_gate, causal=causal, softmax_scale=softmax_scale,
                                       kv_seqlens=kv_seqlens).contiguous()
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, _zero = _attn_prepare(q, k, v, value_gate, None, kv_seqlens,
                                                                             None)
    if q2.shape[0] == 0:
        return torch.zeros_like(q)
    return _ga._decode(q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, causal, softmax_scale).view(q.shape)


@gated_attention_decode.register_fake
def _(q, k, v, value_gate, kv_seqlens, causal, softmax_scale):
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------------- adapter
@torch.library.custom_op(f"{NS}::routed_swiglu_adapter_fwd", mutates_args=())
def routed_swiglu_adapter_fwd(x: torch.Tensor, route: torch.Tensor, perm: torch.Tensor, offs: torch.Tensor,
                              w_gate: torch.Tensor, w_down: torch.Tensor,
                              w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
def routed_swiglu_adapter_bwd(dy: torch.Tensor, x: torch.Tensor, route: torch.Tensor, perm: torch.Tensor,
                              offs: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                              h: torch.Tensor) -> list[torch.Tensor]:
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
    return [x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_down.new_empty(w_down.shape),
            w_up.new_empty(w_up.shape)]


def _adapter_setup(ctx, inputs, output):
    x, route, perm, offs, w_gate, w_down, w_up = inputs
    ctx.save_for_backward(x, route, perm, offs, w_gate, w_down, w_up, output[1])


def _adapter_backward(ctx, dy, _dh):
    x, route, perm, offs, w_gate, w_down, w_up, h = ctx.saved_tensors
    dx, dwg, dwd, dwu = routed_swiglu_adapter_bwd(dy.contiguous(), x, route, perm, offs, w_gate, w_down, w_up, h)
    return dx, None, None, None, dwg, dwd, dwu


routed_swiglu_adapter_fwd.register_autograd(_adapter_backward, setup_context=_adapter_setup)
