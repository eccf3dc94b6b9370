"""Attention backends for PILL's gated attention: one signature, three implementations that must agree.

    attend(q, k, v, value_gate, mask, scale) -> o
    flash-attn layout: q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) with Hq % Hkv == 0 (GQA);
    value_gate: (B, Tk, Hq) or None; o: (B, Tq, Hq, D)

value_gate[b, j, h] scales value row j as seen by QUERY head h (PILL's W_g maps d -> n_heads), 1 at text
tokens. Scaling V rows is the same as scaling the visual columns of the attention matrix after the softmax,
which is not renormalised. The unfused paths therefore expand K/V to Hq heads before gating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pill_kernels import gated_attention


@dataclass
class AttnMask:
    """What a query may attend to. Queries are aligned to the END of the keys (KV-cache decode)."""

    causal: bool = True
    key_padding: torch.Tensor | None = None
    """(B, Tk) bool, True = real key. Only needed with left padding (generation); see PILL.forward."""
    doc_ids: torch.Tensor | None = None
    """(B, Tk) int: packed sequences; a query sees only keys of its own document."""
    cu_seqlens: torch.Tensor | None = None
    """(n_docs + 1,) int32 boundaries of the packed documents (B == 1), for the varlen kernel."""
    max_seqlen: int | None = None


def dense_mask(m: AttnMask, Tq: int, Tk: int, device: torch.device) -> torch.Tensor | None:
    """(B or 1, 1, Tq, Tk) bool mask of allowed (query, key) pairs, or None when nothing is masked."""
    allowed = None
    q_pos = torch.arange(Tk - Tq, Tk, device=device)
    k_pos = torch.arange(Tk, device=device)
    if m.causal:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if m.key_padding is not None:
        kp = m.key_padding.bool()[:, None, None, :]
        allowed = kp if allowed is None else allowed & kp
    if m.doc_ids is not None:
        same = m.doc_ids[:, None, -Tq:, None] == m.doc_ids[:, None, None, :]
        allowed = same if allowed is None else allowed & same
    if allowed is not None and m.key_padding is not None:
        # A left-padding query would otherwise see no key at all (NaN softmax); its output is never used.
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    return allowed


def _expand_and_gate(k, v, value_gate, n_rep):
    if n_rep > 1 or value_gate is not None:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if value_gate is not None:
        v = v * value_gate.transpose(1, 2).unsqueeze(-1).to(v.dtype)  # (B, Hq, Tk, 1)
    return k, v


def eager_attention(q, k, v, value_gate, mask: AttnMask, scale: float) -> torch.Tensor:
    """The reference: materialised scores, softmax in fp32."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    Tq, Tk = q.shape[2], k.shape[2]
    k, v = _expand_and_gate(k, v, value_gate, q.shape[1] // k.shape[1])
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale  # (B, Hq, Tq, Tk)
    allowed = dense_mask(mask, Tq, Tk, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(p, v).transpose(1, 2)


def sdpa_attention(q, k, v, value_gate, mask: AttnMask, scale: float) -> torch.Tensor:
    """Pre-gated values into PyTorch's fused attention (flash / cuDNN / memory-efficient on GPU)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    Tq, Tk = q.shape[2], k.shape[2]
    k, v = _expand_and_gate(k, v, value_gate, q.shape[1] // k.shape[1])
    simple_causal = mask.causal and mask.key_padding is None and mask.doc_ids is None and Tq == Tk
    attn_mask = None if simple_causal else dense_mask(mask, Tq, Tk, q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=simple_causal, scale=scale)
    return o.transpose(1, 2)


def triton_attention(q, k, v, value_gate, mask: AttnMask, scale: float) -> torch.Tensor:
    """kernels.gated_attention: the gate is applied while V tiles are loaded, no gated copy of V exists."""
    if mask.key_padding is not None or (mask.doc_ids is not None and mask.cu_seqlens is None):
        # Left padding only occurs in batched generation; the reference path is exact there.
        return sdpa_attention(q, k, v, value_gate, mask, scale)
    if mask.cu_seqlens is not None:
        assert q.shape[0] == 1, "packed batches hold all documents in one row"
        o = gated_attention(
            q[0],
            k[0],
            v[0],
            None if value_gate is None else value_gate[0],
            causal=mask.causal,
            cu_seqlens=mask.cu_seqlens,
            max_seqlen=mask.max_seqlen,
            softmax_scale=scale,
        )  # (N, Hq, D)
        return o.unsqueeze(0)
    return gated_attention(q, k, v, value_gate, causal=mask.causal, softmax_scale=scale)  # (B, Tq, Hq, D)


ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention}
ATTN_BACKEND_CHOICES = ("auto", *ATTENTION_BACKENDS)
"""What a config's attn_backend may say: a backend, or auto (pipeline.model.backends picks one per device)."""
AttnBackend = Literal[ATTN_BACKEND_CHOICES]
