"""The torch.library custom ops of gated attention and the public ``gated_attention``: the one autograd path
(training, tests and bench all call ``gated_attention``; ``torch.compile(fullgraph=True)`` captures each op as
one graph node).

- ``<ns>::gated_attention_fwd`` (out, LSE) with ``<ns>::gated_attention_bwd`` registered as its backward;
- ``<ns>::gated_attention_decode``: forward only, a few queries against a KV cache (``decode.py``).

The namespace is the package's import name (``pill_kernels`` installed, ``kernels`` from the repo root). Each op
runs the Triton path on CUDA, or under TRITON_INTERPRET=1 when it was set before this module was imported (the
``@triton.jit`` decorator reads it then), and the PyTorch reference otherwise; the reference backward recomputes
the reference under autograd.
"""

from __future__ import annotations

import os

import torch

from .backward import _bwd
from .common import _check, _scale
from .decode import DECODE_MAX_Q, _decode
from .forward import _fwd
from .reference import gated_attention_ref

# The decorator decides at import time whether kernels are interpreted; remember it for the backend switch.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NS = __name__.split(".")[0]  # the package's import name: `pill_kernels` installed, `kernels` from the repo root


def _prepare(q, k, v, g, cu_seqlens, kv_seqlens, max_seqlen):
    """Flatten to the packed layout the kernels use: padded (B, T, H, D) becomes packed rows with synthetic
    cu_seqlens; the gate becomes head-major (Hq, Nk) fp32 (each program reads its head's row contiguously)."""
    dev = q.device
    if cu_seqlens is None:
        bsz, t_q = q.shape[:2]
        t_k = k.shape[1]
        cu_q = torch.arange(0, (bsz + 1) * t_q, t_q, device=dev, dtype=torch.int32)
        cu_k = torch.arange(0, (bsz + 1) * t_k, t_k, device=dev, dtype=torch.int32)
        max_q, max_k = t_q, t_k
        kv_lens = kv_seqlens.to(device=dev, dtype=torch.int32).contiguous() if kv_seqlens is not None else None
    else:
        cu_q = cu_k = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        if max_seqlen is None:  # one host sync (inside the op, invisible to the compiler); pass max_seqlen
            max_seqlen = int((cu_q[1:] - cu_q[:-1]).max().item()) if cu_q.numel() > 1 else 0
        max_q = max_k = int(max_seqlen)
        kv_lens = None
    h_q, d = q.shape[-2:]
    h_kv = k.shape[-2]
    g2 = g.reshape(-1, h_q).t().float().contiguous() if g is not None else None
    zero_init = cu_seqlens is not None or kv_lens is not None  # rows no program visits must be 0
    return (
        q.contiguous().view(-1, h_q, d),
        k.contiguous().view(-1, h_kv, d),
        v.contiguous().view(-1, h_kv, d),
        g2,
        cu_q,
        cu_k,
        kv_lens,
        max_q,
        max_k,
        zero_init,
    )


@torch.library.custom_op(f"{NS}::gated_attention_fwd", mutates_args=())
def gated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    value_gate: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    kv_seqlens: torch.Tensor | None,
    causal: bool,
    max_seqlen: int | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out like q, base-2 LSE head-major (Hq, Nq) fp32; empty on the reference path)."""
    _check(q, k, v, value_gate, cu_seqlens, kv_seqlens)
    if not _use_triton(q):
        out = gated_attention_ref(
            q,
            k,
            v,
            value_gate,
            causal=causal,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            softmax_scale=softmax_scale,
            kv_seqlens=kv_seqlens,
        )
        return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, _max_k, zero_init = _prepare(
        q, k, v, value_gate, cu_seqlens, kv_seqlens, max_seqlen
    )
    if q2.shape[0] == 0 or cu_q.numel() < 2:
        return torch.zeros_like(q), torch.zeros((q.shape[-2], q2.shape[0]), device=q.device)
    o2, lse = _fwd(q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, causal, softmax_scale, zero_init)
    return o2.view(q.shape), lse


@gated_attention_fwd.register_fake
def _(q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale):
    n_q = q.shape[0] * q.shape[1] if cu_seqlens is None else q.shape[0]
    lse_shape = (q.shape[-2], n_q) if _use_triton(q) else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _ref_grads(do, q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale):
    """The reference path's backward: recompute the reference under autograd."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if value_gate is not None:
        leaves.append(value_gate.detach().requires_grad_())
    with torch.enable_grad():
        ref = gated_attention_ref(
            *leaves[:3],
            leaves[3] if value_gate is not None else None,
            causal=causal,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            softmax_scale=softmax_scale,
            kv_seqlens=kv_seqlens,
        )
        return [t.contiguous() for t in torch.autograd.grad(ref, leaves, do)]


@torch.library.custom_op(f"{NS}::gated_attention_bwd", mutates_args=())
def gated_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    value_gate: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    kv_seqlens: torch.Tensor | None,
    causal: bool,
    max_seqlen: int | None,
    softmax_scale: float,
) -> list[torch.Tensor]:
    """-> [dq, dk, dv] (+ [dgate] when a gate was given)."""
    if not _use_triton(q):
        return _ref_grads(do, q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale)
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, zero_init = _prepare(
        q, k, v, value_gate, cu_seqlens, kv_seqlens, max_seqlen
    )
    if q2.shape[0] == 0 or cu_q.numel() < 2:
        grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
        return grads + ([torch.zeros_like(value_gate)] if value_gate is not None else [])
    dq, dk, dv, dg = _bwd(
        do.reshape(q2.shape),
        q2,
        k2,
        v2,
        g2,
        out.reshape(q2.shape),
        lse,
        cu_q,
        cu_k,
        kv_lens,
        max_q,
        max_k,
        causal,
        softmax_scale,
        zero_init,
    )
    grads = [dq.view(q.shape), dk.view(k.shape), dv.view(k.shape)]
    if dg is not None:  # head-major fp32 -> the caller's (..., Tk, Hq) layout and dtype
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
    """The backward of ``gated_attention_fwd``: one call of the bwd op."""
    q, k, v, g, out, lse, cu_seqlens, kv_seqlens = ctx.saved_tensors
    causal, max_seqlen, softmax_scale, has_gate = ctx.meta
    grads = gated_attention_bwd(
        d_out.contiguous(), q, k, v, g, out, lse, cu_seqlens, kv_seqlens, causal, max_seqlen, softmax_scale
    )
    dg = grads[3] if has_gate else None
    return grads[0], grads[1], grads[2], dg, None, None, None, None, None


gated_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


@torch.library.custom_op(f"{NS}::gated_attention_decode", mutates_args=())
def gated_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    value_gate: torch.Tensor | None,
    kv_seqlens: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    """Forward-only split-KV decode (padded layout, Tq <= DECODE_MAX_Q): generation against a KV cache."""
    _check(q, k, v, value_gate, None, kv_seqlens)
    if not _use_triton(q):
        return gated_attention_ref(
            q, k, v, value_gate, causal=causal, softmax_scale=softmax_scale, kv_seqlens=kv_seqlens
        ).contiguous()
    q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, _zero = _prepare(q, k, v, value_gate, None, kv_seqlens, None)
    if q2.shape[0] == 0:
        return torch.zeros_like(q)
    return _decode(q2, k2, v2, g2, cu_q, cu_k, kv_lens, max_q, max_k, causal, softmax_scale).view(q.shape)


@gated_attention_decode.register_fake
def _(q, k, v, value_gate, kv_seqlens, causal, softmax_scale):
    return q.new_empty(q.shape)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")


def _triton_attention(q, k, v, value_gate, causal, cu_seqlens, max_seqlen, softmax_scale, kv_seqlens):
    """The Triton path through the registered custom ops (one graph node each for torch.compile)."""
    scale = _scale(softmax_scale, q.shape[-1])
    if (
        cu_seqlens is None
        and q.dim() == 4
        and q.shape[1] <= DECODE_MAX_Q
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, value_gate)))
    ):
        # generation: a few new queries against the cache, no gradient: split the keys (flash-decoding)
        return gated_attention_decode(q, k, v, value_gate, kv_seqlens, causal, scale)
    return gated_attention_fwd(q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, scale)[0]


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    value_gate: torch.Tensor | None = None,
    *,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    kv_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated attention (design in the package docstring, kernels/attention/__init__.py). ``value_gate`` is the
    gate value g, (B, Tk, Hq) or (N, Hq).

    ``kv_seqlens`` (B,) (padded layout only, an extension of the team contract): valid key count per batch row
    for right-padded batches. Triton on CUDA or under TRITON_INTERPRET=1, else the PyTorch reference.
    """
    if _use_triton(q):
        return _triton_attention(q, k, v, value_gate, causal, cu_seqlens, max_seqlen, softmax_scale, kv_seqlens)
    return gated_attention_ref(
        q,
        k,
        v,
        value_gate,
        causal=causal,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        softmax_scale=softmax_scale,
        kv_seqlens=kv_seqlens,
    )


def plan_launches(q, k, v, g, bsz: int, t: int, causal: bool) -> None:
    """Forward and backward launches for bsz sequences of t tokens packed as q (bsz*t, Hq, D), g head-major
    (Hq, N) fp32 or None (for the compile report, on meta tensors inside ``launch.capture``)."""
    cu = torch.arange(0, (bsz + 1) * t, t, device=q.device, dtype=torch.int32)
    sm_scale = _scale(None, q.shape[-1])
    o, lse = _fwd(q, k, v, g, cu, cu, None, t, causal, sm_scale, False)
    _bwd(o, q, k, v, g, o, lse, cu, cu, None, t, t, causal, sm_scale, False)
