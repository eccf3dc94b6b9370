"""``gated_attention_ref``: gated attention in plain PyTorch, what every Triton path is tested against.

It materialises the (Tq, Tk) scores in fp32, expands K/V per query head (unfused GQA: each query head gates its
own copy of V) and gates V rows; bottom-right causal alignment and ``kv_seqlens`` as the kernels; rows that see
no key output 0.
"""

from __future__ import annotations

import itertools

import torch

from .common import _check, _scale


def _ref_padded(q, k, v, g, causal, sm_scale, kv_seqlens):
    # q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), g (B, Tk, Hq)
    bsz, t_q, h_q, _ = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    rep = h_q // h_kv
    k = k.repeat_interleave(rep, dim=2)  # unfused GQA: expand K/V so each query head can gate its own copy
    v = v.repeat_interleave(rep, dim=2)
    if g is not None:
        v = v * g.to(v.dtype).unsqueeze(-1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * sm_scale  # scores in the input dtype, softmax in fp32
    i = torch.arange(t_q, device=q.device)[:, None]
    j = torch.arange(t_k, device=q.device)[None, :]
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        mask = j <= i + (t_k - t_q)  # bottom-right alignment (KV-cache decode)
    mask = mask.expand(bsz, 1, t_q, t_k)
    if kv_seqlens is not None:
        mask = mask & (j < kv_seqlens.to(q.device).view(bsz, 1, 1, 1))
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))  # rows with no key output 0
    return torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)


def gated_attention_ref(
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
    """Eager PyTorch reference: materialises the (Tq, Tk) scores, expands K/V per query head, gates V rows."""
    _check(q, k, v, value_gate, cu_seqlens, kv_seqlens)
    sm_scale = _scale(softmax_scale, q.shape[-1])
    if cu_seqlens is None:
        return _ref_padded(q, k, v, value_gate, causal, sm_scale, kv_seqlens)
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in itertools.pairwise(bounds):
        g = value_gate[None, s:e] if value_gate is not None else None
        outs.append(_ref_padded(q[None, s:e], k[None, s:e], v[None, s:e], g, causal, sm_scale, None)[0])
    out = torch.cat(outs) if outs else q.new_zeros((0,) + q.shape[1:])
    if out.shape[0] != q.shape[0]:  # tokens past cu_seqlens[-1] belong to no sequence
        out = torch.cat([out, q.new_zeros((q.shape[0] - out.shape[0],) + q.shape[1:])])
    return out
