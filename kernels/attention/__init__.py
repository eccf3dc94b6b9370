"""Gated FlashAttention: softmax attention whose value rows are scaled by PILL's modality-aware gate.

Paper: PILL (arXiv 2311.02126), "Modality-Attention-Gating" (MAG); kernel after FlashAttention-2 (Dao, 2023)
and the Triton fused-attention tutorial.

    o[i, h] = sum_j softmax_j(q[i, h] . k[j, hk] * scale + mask) * g[j, h] * v[j, hk]      hk = h // (Hq // Hkv)

Split by phase, as FlashAttention's Triton backend is:

    common.py      Triton helpers every phase shares (sequence bounds, tile loads), argument checks
    tiles.py       tile sizes per (head dim, dtype, arch); the TMA and overlap switches
    forward.py     the training forward (prefill): online softmax, only the LSE saved
    decode.py      split-KV decode against a KV cache (forward only)
    backward.py    delta, dK/dV, dQ and the gate's gradient
    op.py          the torch.library custom ops and the public ``gated_attention``
    reference.py   ``gated_attention_ref`` in plain PyTorch

Design choices shared by every phase
- The gate argument is the gate VALUE g (already ``tanh``'d, 1 at text tokens), shape (B, T, Hq) or (N, Hq),
  not the logit plus a modality mask: the caller (the model) owns W_g and the mask, the kernel only needs one
  multiplier per (key, query head). The softmax is not renormalised (PILL scales V rows, i.e. columns of P).
- The gate is per QUERY head. With GQA several query heads share one K/V row but may scale it differently, so
  the gate scales the columns of P (p_ij * g_j, fp32 in registers) inside the program of the query head before
  P V; no gated copy of V is ever materialised (the eager reference must expand K/V per query head instead).
  Gate, LSE and delta are head-major (Hq, N) fp32: contiguous loads per program.
- Layouts: padded (B, T, H, D) is flattened to the packed (N, H, D) layout with synthetic cu_seqlens, so one
  kernel serves both. Per sequence, queries are aligned to the END of the keys (bottom-right causal, as in
  flash-attn), which makes the KV-cache decode step (Tq < Tk) work natively: query i sees key j iff
  j <= i + Tk - Tq. Query rows that see no key (Tq > Tk, or an empty sequence) output 0.
- Right padding: either pass ``kv_seqlens`` (B,) (keys at positions >= kv_seqlens[b] are masked; padded query
  rows still compute something and must be ignored by the loss), or unpad and use the varlen path. The causal
  alignment stays Tk - Tq of the TENSORS, which is right for training batches (Tq == Tk) and for one-token decode
  against a right-padded static cache; a multi-token chunk into a padded static cache needs the reference.
- Head dims: any D; tiles use the next power of two >= 16 with masked loads (64 and 128 are the tuned cases).

Caveats
- Under TRITON_INTERPRET=1, ``tl.dot`` on bf16 is wrong (triton issue 11584): the launchers then upcast tiles
  to fp32 (``DOT_F32``). fp32 on GPU uses IEEE dots (slow; bf16/fp16 are the GPU paths).
- The Triton path is picked when the tensors are on CUDA, or when TRITON_INTERPRET=1 was set before this package
  was imported; otherwise the PyTorch reference runs (op.py).
- Block sizes for the GPU come from a (BLOCK_D, dtype, arch) table checked with the compile report
  (``python -m kernels.bench --compile-report``), not autotuned or timed (tiles.py).
"""

from .op import gated_attention, gated_attention_bwd, gated_attention_decode, gated_attention_fwd, plan_launches
from .reference import gated_attention_ref

__all__ = [
    "gated_attention",
    "gated_attention_bwd",
    "gated_attention_decode",
    "gated_attention_fwd",
    "gated_attention_ref",
    "plan_launches",
]
