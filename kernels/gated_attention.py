"""Gated FlashAttention: softmax attention whose value rows are scaled by PILL's modality-aware gate.

Paper: PILL (arXiv 2311.02126), "Modality-Attention-Gating" (MAG); kernel after FlashAttention-2 (Dao, 2023)
and the Triton fused-attention tutorial.

    o[i, h] = sum_j softmax_j(q[i, h] . k[j, hk] * scale + mask) * g[j, h] * v[j, hk]      hk = h // (Hq // Hkv)

Design choices
- The gate argument is the gate VALUE g (already ``tanh``'d, 1 at text tokens), shape (B, T, Hq) or (N, Hq),
  not the logit plus a modality mask: the caller (the model) owns W_g and the mask, the kernel only needs one
  multiplier per (key, query head). The softmax is not renormalised (PILL scales V rows, i.e. columns of P).
- The gate is per QUERY head. With GQA several query heads share one K/V row but may scale it differently, so
  the gate scales the columns of P (p_ij * g_j, fp32 in registers) inside the program of the query head before
  P V; no gated copy of V is ever materialised (the eager reference must expand K/V per query head instead).
  Gate, LSE and delta are head-major (Hq, N) fp32: contiguous loads per program.
- Forward: online softmax in base 2 (log2(e) folded into the scale), fp32 accumulators, only the row
  log-sum-exp (base 2, fp32) is saved. Key blocks fully inside the causal/length mask run an unmasked
  specialisation; only the boundary blocks pay for the mask.
- Backward: delta = rowsum(O * dO) (a small preprocess kernel), one kernel per key block for dK/dV in the
  transposed orientation (keys are the rows of every dot: wgmma-sized), looping over the query heads of its KV
  group (GQA needs no atomics), one kernel per query block for dQ and the gate's gradient
  dg[j, h] = sum_i P[i, j] * (dO[i] . v[j]) (UNgated V; dP = g * (dO V^T)): the dQ loop has P and dO V^T in
  registers, so it writes their column sums as one fp32 partial row per (query block, head), summed once
  afterwards. Deterministic (no atomics), and the dK/dV loop carries no gate accumulator: gated and ungated
  dK/dV run the same tile (before: 16 x 64 with m64n8k16 wgmma at d128).
- Scheduling: causal query blocks start longest first (forward and dQ); dK/dV halves its key tile when the grid
  would not cover the SMs (few KV heads, e.g. SmolLM2's 3).
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
- Under TRITON_INTERPRET=1, ``tl.dot`` on bf16 is wrong (triton issue 11584): the launcher then upcasts tiles
  to fp32 (``DOT_F32``). fp32 on GPU uses IEEE dots (slow; bf16/fp16 are the GPU paths).
- The Triton path is picked when the tensors are on CUDA, or when TRITON_INTERPRET=1 was set before this module
  was imported (the ``@triton.jit`` decorator reads it then); otherwise the PyTorch reference runs.
- The gate-gradient partials take cdiv(max_seqlen, BLOCK_M) x Hq x Nk x 4 bytes (8 MB at 2 x 2048, 32 heads;
  they grow with the square of the sequence length: ~1 GB at one 32k sequence). An opt-in atomic variant is
  not written yet.
- Block sizes for the GPU come from a (BLOCK_D, dtype, arch) table checked with the compile report
  (``python -m kernels.bench --compile-report``), not autotuned or timed (no GPU here).
"""

from __future__ import annotations

import itertools
import math
import os

import torch
import triton
import triton.language as tl

from .launch import ensure_scratch_allocator, launch, on_gpu

LOG2E = 1.4426950408889634
# The decorator decides at import time whether kernels are interpreted; remember it for the backend switch.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS: tl.constexpr):
    """Start rows and lengths of sequence b; diag is the bottom-right causal offset (Tk - Tq)."""
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    k_full = tl.load(CU_K + b + 1) - k_start
    diag = k_full - q_len
    k_len = k_full
    if HAS_KV_LENS:
        k_len = tl.minimum(tl.load(KV_LENS + b), k_full)
    return q_start.to(tl.int64), q_len, k_start.to(tl.int64), k_len, diag


@triton.jit
def _key_bounds(start_m, k_len, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range [0, hi) that query block start_m may see; [0, full_end) needs no mask."""
    if CAUSAL:
        hi = tl.minimum(k_len, tl.maximum(start_m + BLOCK_M + diag, 0))
        full_end = tl.minimum(k_len, tl.maximum(start_m + diag + 1, 0))
    else:
        hi = k_len
        full_end = k_len
    return (full_end // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _load_rows(
    base, offs_n, offs_d, stride, n_lim, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr
):
    """A (rows x BLOCK_D) tile. The row mask only in boundary blocks (a block inside the sequence loads
    unpredicated), the column mask only where the head dim is not a power of two."""
    ptrs = base + offs_n[:, None].to(tl.int64) * stride + offs_d[None, :]
    if MASK_ROWS:
        t = tl.load(ptrs, mask=(offs_n[:, None] < n_lim) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _kv_descriptor(base, k_len, stride, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A TMA descriptor over one sequence's K or V rows of one KV head: rows past k_len and columns past the
    head dim arrive as zeros, so no load needs a mask and a padded cache's stale rows are never read. (One row
    at least: an empty sequence's descriptor is built but never loaded from.)"""
    return tl.make_tensor_descriptor(base, [tl.maximum(k_len, 1), HEAD_DIM], [stride, 1], [BLOCK_N, BLOCK_D])


@triton.jit
def _load_kv(
    src,
    start_n,
    offs_n,
    offs_d,
    stride,
    n_lim,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    TMA: tl.constexpr,
):
    """A (BLOCK_N x BLOCK_D) K or V tile: one bulk copy through a descriptor (TMA), or pointer loads."""
    if TMA:
        t = src.load([start_n, 0])
    else:
        t = _load_rows(src, offs_n, offs_d, stride, n_lim, HEAD_DIM, BLOCK_D, MASK_ROWS)
    return t


@triton.jit
def _softmax_step(
    qk,
    m_i,
    l_i,
    offs_m,
    offs_n,
    g_base,
    k_len,
    diag,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    """One key block of the online softmax, from its unscaled scores: -> (gated P, rescale factor, new row max,
    new row sum)."""
    qk = qk * qk_scale
    if MASKED:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # a row may have seen no key yet: keep exp2(-inf - -inf) from producing NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.exp2(qk - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)  # the gate does not enter the normaliser
    if HAS_GATE:
        # gate on the columns of P (one multiply of the fp32 tile already in registers), not on the V tile:
        # V goes from shared memory straight into the wgmma; the head-major gate row is a contiguous load
        if MASKED:
            g = tl.load(g_base + offs_n, mask=offs_n < k_len, other=0.0)
        else:
            g = tl.load(g_base + offs_n)
        p = p * g[None, :]
    return p, alpha, m_new, l_i


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    g_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    k_len,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    """Key blocks [lo, hi) in order: S = Q K^T, softmax, O += P V. k_base / v_base: tensor descriptors when
    TMA, else pointers to the sequence's first row of the KV head."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(k_base, start_n, offs_n, offs_d, stride_kt, k_len, HEAD_DIM, BLOCK_D, MASKED, TMA)
        v = _load_kv(v_base, start_n, offs_n, offs_d, stride_vt, k_len, HEAD_DIM, BLOCK_D, MASKED, TMA)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p, alpha, m_i, l_i = _softmax_step(
            qk, m_i, l_i, offs_m, offs_n, g_base, k_len, diag, qk_scale, MASKED, CAUSAL, HAS_GATE
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_overlap(
    acc,
    l_i,
    m_i,
    qk,
    q,
    k_desc,
    v_desc,
    g_base,
    offs_m,
    lo,
    hi,
    k_len,
    diag,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Key blocks [lo, hi) software-pipelined so the softmax overlaps a wgmma: ``qk`` holds block lo's scores
    (issued by the caller), each step runs block j's softmax, then issues block j+1's Q K^T and block j's P V
    and leaves the P V in flight into the next step's softmax. Triton's Hopper pipeliner waits for every wgmma
    right after a Q K^T (its result feeds non-dot code), so this order is the one where a wgmma (P V of block
    j-1) is still running while block j's exp2s execute. TMA descriptors only: the look-ahead load of block
    j+1 may lie past the keys, where a descriptor gives zeros. Returns block hi's scores for the next range."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        v = v_desc.load([start_n, 0])
        if DOT_F32:
            v = v.to(tl.float32)
        p, alpha, m_i, l_i = _softmax_step(
            qk, m_i, l_i, offs_m, offs_n, g_base, k_len, diag, qk_scale, MASKED, CAUSAL, HAS_GATE
        )
        k = k_desc.load([start_n + BLOCK_N, 0])
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_i, qk


@triton.jit
def _causal_block(CAUSAL: tl.constexpr):
    """Block index along the query axis (grid axis 2, the slowest: the hardware starts programs in grid order).
    Causal rows are started longest first (the last query block sees the most keys), so the short blocks fill
    the tail of the launch instead of one long block running alone at its end."""
    if CAUSAL:
        m = tl.num_programs(2) - 1 - tl.program_id(2)
    else:
        m = tl.program_id(2)
    return m


@triton.jit(do_not_specialize=["stride_gh", "stride_lh"])
def _gated_attn_fwd_kernel(
    Q,
    K,
    V,
    G,
    OUT,
    LSE,
    CU_Q,
    CU_K,
    KV_LENS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gh,
    stride_ot,
    stride_oh,
    stride_lh,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    # G and LSE are head-major (Hq, N): stride_gh / stride_lh are the token count, not specialised on (a new
    # sequence length must not compile a new kernel). Grid (Hq, sequences, query blocks): neighbouring programs
    # are the heads of one KV group at one query block, so they share the K/V tiles in L2.
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    start_m = _causal_block(CAUSAL) * BLOCK_M
    q_start, q_len, k_start, k_len, diag = _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS)
    if start_m >= q_len:
        return
    h_kv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = (q_start + offs_m)[:, None].to(tl.int64)
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + row * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    if TMA:
        k_base = _kv_descriptor(k_base, k_len, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_base = _kv_descriptor(v_base, k_len, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D)
    g_base = G + h * stride_gh + k_start

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_bounds(start_m, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)
    if OVERLAP:
        k = k_base.load([0, 0])
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        acc, l_i, m_i, qk = _fwd_inner_overlap(
            acc,
            l_i,
            m_i,
            qk,
            q,
            k_base,
            v_base,
            g_base,
            offs_m,
            0,
            full_end,
            k_len,
            diag,
            qk_scale,
            BLOCK_N,
            False,
            CAUSAL,
            HAS_GATE,
            DOT_F32,
            DOT_PREC,
        )
        acc, l_i, m_i, qk = _fwd_inner_overlap(
            acc,
            l_i,
            m_i,
            qk,
            q,
            k_base,
            v_base,
            g_base,
            offs_m,
            full_end,
            hi,
            k_len,
            diag,
            qk_scale,
            BLOCK_N,
            True,
            CAUSAL,
            HAS_GATE,
            DOT_F32,
            DOT_PREC,
        )
    else:
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            g_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            0,
            full_end,
            k_len,
            diag,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            False,
            CAUSAL,
            HAS_GATE,
            DOT_F32,
            DOT_PREC,
            TMA,
        )
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            g_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            full_end,
            hi,
            k_len,
            diag,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            True,
            CAUSAL,
            HAS_GATE,
            DOT_F32,
            DOT_PREC,
            TMA,
        )
    empty = l_i == 0.0  # no visible key: output 0, LSE +inf so the backward sees P = 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(OUT + row * stride_ot + h * stride_oh + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


@triton.jit(do_not_specialize=["stride_gh", "stride_mh", "stride_ms", "chunk"])
def _gated_attn_decode_kernel(
    Q,
    K,
    V,
    G,
    OPART,
    MPART,
    LPART,
    CU_Q,
    CU_K,
    KV_LENS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ms,
    stride_mh,
    chunk,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Split-KV decode (flash-decoding): the (<= BLOCK_M) query rows of one (sequence, head) against key chunk s;
    writes the unnormalised accumulator and the running max / sum, combined over the chunks afterwards."""
    s = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, diag = _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS)
    h_kv = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = (q_start + offs_m)[:, None].to(tl.int64)
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + row * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    g_base = G + h * stride_gh + k_start
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_bounds(0, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)
    lo = s * chunk  # chunk and full_end are multiples of BLOCK_N: both ranges start on a tile
    end = lo + chunk
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        g_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        lo,
        tl.minimum(end, full_end),
        k_len,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
        False,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        g_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        tl.maximum(lo, full_end),
        tl.minimum(end, hi),
        k_len,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
        False,
    )
    m_valid = offs_m < q_len
    tl.store(OPART + s.to(tl.int64) * stride_os + row * stride_ot + h * stride_oh + offs_d[None, :], acc, mask=q_mask)
    m_off = s.to(tl.int64) * stride_ms + h * stride_mh + q_start + offs_m
    tl.store(MPART + m_off, m_i, mask=m_valid)
    tl.store(LPART + m_off, l_i, mask=m_valid)


@triton.jit(do_not_specialize=["n_rows", "stride_dh"])
def _bwd_delta_kernel(
    O,
    DO,
    DELTA,
    n_rows,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dh,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, i] = rowsum(O[i, h] * dO[i, h]) in fp32, head-major like the LSE (one read of O and dO)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < n_rows
    mask = t_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(O + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_dh + offs_t, tl.sum(o * do, 1), mask=t_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    g,
    Q,
    DO,
    G,
    LSE,
    DELTA,
    q_start,
    h_kv,
    krow,
    n_valid,
    stride_qt,
    stride_qh,
    stride_dot,
    stride_doh,
    stride_gh,
    stride_lh,
    offs_n,
    offs_d,
    lo,
    hi,
    q_len,
    diag,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Transposed orientation (keys are the rows: BLOCK_N = 64-128 rows per dot, enough for wgmma):
    S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q, over the query blocks [lo, hi) of every query head
    of the KV group, as ONE flat loop (head-major): a loop nest over heads would keep more state live across
    the inner loop and spill at d128 (184 B measured, ungated 32/8 heads).

    The gate's own gradient is not computed here (the dQ kernel has P and dO V^T and takes its column sums), so
    the gated loop carries no extra accumulator and runs the ungated tiles. One query head per KV head: dv
    accumulates the ungated P^T dO and the caller gates it once (``g`` given); under GQA the heads share the dV
    tile with different gates, so the gate row is loaded per step and scales P^T."""
    n_blocks = (hi - lo) // BLOCK_M
    for it in range(0, GROUP * n_blocks):
        h = h_kv * GROUP + it // n_blocks
        start_m = lo + (it % n_blocks) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        row = (q_start + offs_m).to(tl.int64)
        # rows past q_len load zeros: their dO and delta are 0, so they add nothing even unmasked
        q_mask = m_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + row[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + row[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lh + row, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + row, mask=m_valid, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASKED and CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dO . v with the UNgated v
        if HAS_GATE and GROUP > 1:
            g = tl.load(G + h * stride_gh + krow, mask=n_valid, other=0.0)
            dv = tl.dot((p_t * g[:, None]).to(do.dtype), do, dv, input_precision=DOT_PREC)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        if HAS_GATE:
            dp_t = dp_t * g[:, None]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["stride_gh", "stride_lh"])
def _gated_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    G,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
    KV_LENS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gh,
    stride_dot,
    stride_doh,
    stride_lh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid (Hkv, sequences, key blocks): key block 0 sees every causal query row, so ascending order on the
    # slowest axis starts the longest programs first
    h_kv = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    start_n = tl.program_id(2) * BLOCK_N
    q_start, q_len, k_start, k_len, diag = _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS)
    if start_n >= k_len:  # padded keys keep the zeros the launcher allocated
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_len
    krow = (k_start + offs_n).to(tl.int64)
    kv_mask = n_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + krow[:, None] * stride_kt + h_kv * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + krow[:, None] * stride_vt + h_kv * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # Query blocks [lo, mid) straddle the causal diagonal: masked; [mid, q_end) are not. Keys past k_len need no
    # mask here: row j of P^T only feeds dK/dV row j, and those rows are never stored.
    q_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    else:
        lo = q_end * 0
        mid = q_end * 0
    lo = tl.minimum(lo, q_end)
    mid = tl.minimum(tl.maximum(mid, lo), q_end)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_GATE and GROUP == 1:
        g = tl.load(G + h_kv * stride_gh + krow, mask=n_valid, other=0.0)
    else:
        g = tl.zeros([BLOCK_N], tl.float32)  # GQA: loaded per step inside the loop (or no gate)
    dk, dv = _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        g,
        Q,
        DO,
        G,
        LSE,
        DELTA,
        q_start,
        h_kv,
        krow,
        n_valid,
        stride_qt,
        stride_qh,
        stride_dot,
        stride_doh,
        stride_gh,
        stride_lh,
        offs_n,
        offs_d,
        lo,
        mid,
        q_len,
        diag,
        qk_scale,
        GROUP,
        HEAD_DIM,
        BLOCK_M,
        True,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
    )
    dk, dv = _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        g,
        Q,
        DO,
        G,
        LSE,
        DELTA,
        q_start,
        h_kv,
        krow,
        n_valid,
        stride_qt,
        stride_qh,
        stride_dot,
        stride_doh,
        stride_gh,
        stride_lh,
        offs_n,
        offs_d,
        mid,
        q_end,
        q_len,
        diag,
        qk_scale,
        GROUP,
        HEAD_DIM,
        BLOCK_M,
        False,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
    )
    if HAS_GATE and GROUP == 1:
        dv = dv * g[:, None]  # one head owns the tile: gate the ungated P^T dO once
    dk = dk * sm_scale
    tl.store(
        DK + krow[:, None] * stride_dkt + h_kv * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        DV + krow[:, None] * stride_dvt + h_kv * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask
    )


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    g_base,
    dg_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    k_len,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    """dQ += dS K over the key blocks; with a gate also the gate's gradient of this query block,
    dg_j = sum_i P_ij (dO_i . v_j): the column sums of P * (dO V^T) (UNgated), both already in registers.
    k_base / v_base: tensor descriptors when TMA, else pointers (as in the forward)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(k_base, start_n, offs_n, offs_d, stride_kt, k_len, HEAD_DIM, BLOCK_D, MASKED, TMA)
        v = _load_kv(v_base, start_n, offs_n, offs_d, stride_vt, k_len, HEAD_DIM, BLOCK_D, MASKED, TMA)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if MASKED:
            valid = offs_n[None, :] < k_len
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_GATE:
            # one program per (query block, head) owns this partial row: no atomics, summed once afterwards
            if MASKED:
                g = tl.load(g_base + offs_n, mask=offs_n < k_len, other=0.0)
                tl.store(dg_base + offs_n, tl.sum(p * dp, 0), mask=offs_n < k_len)
            else:
                g = tl.load(g_base + offs_n)
                tl.store(dg_base + offs_n, tl.sum(p * dp, 0))
            dp = dp * g[None, :]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["stride_gh", "stride_lh", "stride_gp"])
def _gated_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    G,
    DO,
    LSE,
    DELTA,
    DQ,
    DGP,
    CU_Q,
    CU_K,
    KV_LENS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gh,
    stride_dot,
    stride_doh,
    stride_lh,
    stride_dqt,
    stride_dqh,
    stride_gp,
    qk_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    # DGP: the gate-gradient partials (query blocks, Hq, Nk) fp32, zero-filled; grid as the forward's
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    m_block = _causal_block(CAUSAL)
    start_m = m_block * BLOCK_M
    q_start, q_len, k_start, k_len, diag = _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS)
    if start_m >= q_len:
        return
    h_kv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    row = (q_start + offs_m).to(tl.int64)
    q_mask = m_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + row[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + row[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lh + row, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + h * stride_lh + row, mask=m_valid, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    if TMA:
        k_base = _kv_descriptor(k_base, k_len, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_base = _kv_descriptor(v_base, k_len, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D)
    g_base = G + h * stride_gh + k_start
    dg_base = DGP + m_block.to(tl.int64) * stride_gp + h * stride_gh + k_start
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_bounds(start_m, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        g_base,
        dg_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        0,
        full_end,
        k_len,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        False,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
        TMA,
    )
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        g_base,
        dg_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        full_end,
        hi,
        k_len,
        diag,
        qk_scale,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        True,
        CAUSAL,
        HAS_GATE,
        DOT_F32,
        DOT_PREC,
        TMA,
    )
    dq = dq * sm_scale
    tl.store(DQ + row[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    """Power-of-two tile width >= head_dim (tl.arange needs powers of two): 80 and 96 run as 128-wide tiles with
    masked loads (60% / 33% extra dot work, see docs/kernels.md)."""
    return max(16, triton.next_power_of_2(head_dim))


def _cfg(m, n, warps, stages):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


# Tiles per (BLOCK_D, dtype) on Hopper (sm_90), chosen from the compile report (wgmma for every dot, no spills,
# shared memory within 227 KB; docs/kernels.md); not tuned on a GPU yet. fwd: BLOCK_M queries x BLOCK_N keys;
# dkdv: BLOCK_M queries streamed past BLOCK_N keys (the keys are the wgmma rows); dq: BLOCK_M queries x BLOCK_N
# keys. Gated and ungated attention share every tile (the gate's gradient lives in the dQ kernel). Sequence
# length is not part of the key: a new length never compiles a new kernel. fwd_tma: the forward when K/V arrive
# through TMA descriptors (no address registers, no masks): at d128 a 128-key tile fits without spilling (wgmma
# N 128 for both matmuls), where the pointer-load kernel at that tile spills. fwd_overlap: the forward whose softmax
# overlaps the previous block's P V (_fwd_inner_overlap; two score tiles live, so 64 keys per step and 8 warps:
# no spill at d64/d128), preferred over fwd_tma where both exist unless FWD_OVERLAP is off. dq_tma likewise: 64 keys per step
# at d64/d128 (wgmma N 64, was 32), and at d256 a tile that spills under neither Triton (3.6 spilled 308 B).
_BF16 = (torch.bfloat16, torch.float16)
_HOPPER = {
    **{
        (64, dt): {
            "fwd": _cfg(128, 64, 4, 3),
            "fwd_overlap": _cfg(128, 64, 8, 3),
            "dkdv": _cfg(32, 128, 8, 2),
            "dq": _cfg(128, 32, 4, 2),
            "dq_tma": _cfg(128, 64, 8, 2),
        }
        for dt in _BF16
    },
    **{
        (128, dt): {
            "fwd": _cfg(128, 64, 8, 3),
            "fwd_tma": _cfg(128, 128, 8, 2),
            "fwd_overlap": _cfg(128, 64, 8, 3),
            "dkdv": _cfg(32, 128, 8, 2),
            "dq": _cfg(128, 32, 8, 2),
            "dq_tma": _cfg(128, 64, 8, 2),
        }
        for dt in _BF16
    },
    **{
        (256, dt): {
            "fwd": _cfg(64, 64, 8, 2),
            "dkdv": _cfg(32, 64, 8, 1),
            "dq": _cfg(128, 16, 8, 1),
            "dq_tma": _cfg(64, 32, 8, 2),
        }
        for dt in _BF16
    },
}
# dK/dV when the grid above would leave SMs idle (few KV heads, e.g. SmolLM2's 3 at 2 x 2048: 96 programs for
# 132 SMs): half as many keys per program, twice the programs
_DKDV_NARROW = {64: _cfg(32, 64, 4, 2), 128: _cfg(32, 64, 4, 2)}
# Any other GPU / head dim with bf16/fp16: small tiles that fit Ampere's 164 KB.
_FALLBACK = {"fwd": _cfg(64, 32, 4, 2), "dkdv": _cfg(32, 64, 4, 1), "dq": _cfg(64, 32, 4, 1)}
# fp32 (IEEE dots on CUDA cores, a correctness path): tiles small enough not to spill up to head dim 128
_FP32 = {w: {"fwd": _cfg(32, 32, w, 1), "dkdv": _cfg(16, 32, w, 1), "dq": _cfg(32, 16, w, 1)} for w in (4, 8)}
_INTERP = {
    "fwd": _cfg(16, 16, 1, 1),
    "fwd_overlap": _cfg(16, 16, 1, 1),
    "dkdv": _cfg(16, 16, 1, 1),
    "dq": _cfg(16, 16, 1, 1),
}
H100_SMS = 132  # what a launch planned on meta tensors (the compile report) is sized for


def _arch(device: torch.device) -> int:
    """sm version the launch is for: the CUDA device's, or 90 when only planning (meta tensors)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def _configs(block_d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes per kernel from the (BLOCK_D, dtype, arch) table; the interpreter runs programs one by one,
    so small tiles keep it fast."""
    if not on_gpu(device):
        return _INTERP
    if dtype == torch.float32:
        return _FP32[8 if block_d >= 128 else 4]
    table = _HOPPER if _arch(device) == 90 else {}
    return dict(table.get((max(64, block_d), dtype), _FALLBACK))


def _dkdv_config(cfgs: dict, block_d: int, dtype: torch.dtype, device: torch.device, n_programs) -> dict:
    """The dK/dV tile; the narrow one on Hopper when ``n_programs(BLOCK_N)`` would not cover the SMs."""
    cfg = cfgs["dkdv"]
    narrow = _DKDV_NARROW.get(block_d)
    if (
        narrow
        and on_gpu(device)
        and dtype in _BF16
        and _arch(device) == 90
        and n_programs(cfg["BLOCK_N"]) < _sm_count(device)
    ):
        return narrow
    return cfg


# K/V tiles of the forward through TMA descriptors where the Triton has them (3.6 and 3.9 do) and the GPU is a
# Hopper or newer; PILL_ATTN_TMA=0 keeps pointer loads (the fallback, and a switch for comparing the two)
USE_TMA = os.environ.get("PILL_ATTN_TMA", "1") != "0"
# with TMA, the forward whose softmax overlaps a wgmma (64 keys per step) where the tile table has one, else the
# in-order loop at fwd_tma's wider tile; PILL_ATTN_OVERLAP=0 picks the latter (the first GPU hour times both)
FWD_OVERLAP = os.environ.get("PILL_ATTN_OVERLAP", "1") != "0"
_TMA_ALIGN = 16  # bytes: TMA needs 16-byte-aligned row starts and strides


def _tma_ok(*kv: torch.Tensor) -> bool:
    """Whether the forward may load these K/V tensors through device-side TMA descriptors: the installed Triton
    builds them, the target is sm_90+ (or the interpreter, which emulates them), and each tensor's row starts
    and strides are 16-byte aligned with unit stride along the head dim."""
    if not (USE_TMA and hasattr(tl, "make_tensor_descriptor")):
        return False
    device = kv[0].device
    if on_gpu(device) and _arch(device) < 90:
        return False
    for t in kv:
        elt = t.element_size()
        if t.stride(-1) != 1 or any((st * elt) % _TMA_ALIGN for st in t.stride()[:-1]):
            return False
        if t.device.type != "meta" and t.data_ptr() % _TMA_ALIGN:
            return False
    return True


def _use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """_tma_ok, and on a CUDA device the scratch allocator the device-side descriptors need (set per thread)."""
    tma = _tma_ok(k, v)
    if tma and k.device.type == "cuda":
        ensure_scratch_allocator()
    return tma


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    return {
        "DOT_F32": not on_gpu(device) and dtype == torch.bfloat16,
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
    }


def _fwd(q, k, v, g, cu_q, cu_k, kv_lens, max_q, causal, sm_scale, zero_init):
    """q (Nq, Hq, D), k/v (Nk, Hkv, D), g head-major (Hq, Nk) fp32 or None -> o (Nq, Hq, D) and the base-2 LSE,
    head-major (Hq, Nq) fp32.

    zero_init: some rows may be visited by no program (packed tokens past cu_seqlens[-1], padded keys)."""
    n_q, h_q, d = q.shape
    group = h_q // k.shape[1]
    n_seq = cu_q.numel() - 1
    o = torch.zeros_like(q) if zero_init else torch.empty_like(q)
    lse = torch.empty((h_q, n_q), device=q.device, dtype=torch.float32)
    block_d = _block_d(d)
    tma = _use_tma(k, v)
    cfgs = _configs(block_d, q.dtype, q.device)
    overlap = tma and FWD_OVERLAP and "fwd_overlap" in cfgs
    cfg = cfgs["fwd_overlap"] if overlap else cfgs["fwd_tma"] if tma and "fwd_tma" in cfgs else cfgs["fwd"]
    grid = (h_q, n_seq, triton.cdiv(max_q, cfg["BLOCK_M"]))
    launch(
        _gated_attn_fwd_kernel,
        grid,
        q,
        k,
        v,
        g if g is not None else lse,
        o,
        lse,
        cu_q,
        cu_k,
        kv_lens if kv_lens is not None else cu_q,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        g.stride(0) if g is not None else 0,
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        sm_scale * LOG2E,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        CAUSAL=causal,
        HAS_GATE=g is not None,
        HAS_KV_LENS=kv_lens is not None,
        TMA=tma,
        OVERLAP=overlap,
        **_dot_flags(q.dtype, q.device),
        **cfg,
    )
    return o, lse


def _delta(o, do, block_d):
    """rowsum(O * dO) per (head, row), head-major (Hq, N) fp32, in one small kernel."""
    n, h_q, d = o.shape
    delta = torch.empty((h_q, n), device=o.device, dtype=torch.float32)
    block_t = 16 if not on_gpu(o.device) else max(16, min(128, 8192 // block_d))
    launch(
        _bwd_delta_kernel,
        (triton.cdiv(n, block_t), h_q),
        o,
        do,
        delta,
        n,
        o.stride(0),
        o.stride(1),
        do.stride(0),
        do.stride(1),
        delta.stride(0),
        HEAD_DIM=d,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4 if on_gpu(o.device) else 1,
    )
    return delta


def _bwd(do, q, k, v, g, o, lse, cu_q, cu_k, kv_lens, max_q, max_k, causal, sm_scale, zero_init):
    """Gradients; g / lse head-major as from ``_fwd``; dg comes back head-major (Hq, Nk) fp32."""
    _n_q, h_q, d = q.shape
    h_kv = k.shape[1]
    n_seq = cu_q.numel() - 1
    do = do.contiguous()
    block_d = _block_d(d)
    # delta_i = rowsum(O_i * dO_i) = sum_j P_ij dP_ij also with the gate inside dP (see module docstring)
    delta = _delta(o, do, block_d)
    alloc = torch.zeros_like if zero_init else torch.empty_like  # rows no program visits must get 0
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    cfgs = _configs(block_d, q.dtype, q.device)
    dkdv = _dkdv_config(cfgs, block_d, q.dtype, q.device, lambda bn: triton.cdiv(max_k, bn) * h_kv * n_seq)
    tma = _use_tma(k, v)
    dq_cfg = cfgs["dq_tma"] if tma and "dq_tma" in cfgs else cfgs["dq"]
    n_mblocks = triton.cdiv(max_q, dq_cfg["BLOCK_M"])
    # the gate's gradient: one fp32 partial row per (dQ query block, head), zero where a block sees no key,
    # summed below; deterministic (no atomics) at cdiv(max_q, BLOCK_M) x Hq x Nk x 4 bytes
    dg_part = torch.zeros((n_mblocks, h_q, k.shape[0]), device=q.device) if g is not None else None
    flags = dict(
        GROUP=h_q // h_kv,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        CAUSAL=causal,
        HAS_GATE=g is not None,
        HAS_KV_LENS=kv_lens is not None,
        **_dot_flags(q.dtype, q.device),
    )
    g_arg = g if g is not None else lse
    kv_arg = kv_lens if kv_lens is not None else cu_q
    common = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        g.stride(0) if g is not None else 0,
        do.stride(0),
        do.stride(1),
        lse.stride(0),
    )
    launch(
        _gated_attn_bwd_dkdv_kernel,
        (h_kv, n_seq, triton.cdiv(max_k, dkdv["BLOCK_N"])),
        q,
        k,
        v,
        g_arg,
        do,
        lse,
        delta,
        dk,
        dv,
        cu_q,
        cu_k,
        kv_arg,
        *common,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        sm_scale * LOG2E,
        sm_scale,
        **flags,
        **dkdv,
    )
    launch(
        _gated_attn_bwd_dq_kernel,
        (h_q, n_seq, n_mblocks),
        q,
        k,
        v,
        g_arg,
        do,
        lse,
        delta,
        dq,
        dg_part if g is not None else lse,
        cu_q,
        cu_k,
        kv_arg,
        *common,
        dq.stride(0),
        dq.stride(1),
        dg_part.stride(0) if g is not None else 0,
        sm_scale * LOG2E,
        sm_scale,
        TMA=tma,
        **flags,
        **dq_cfg,
    )
    dg = dg_part.sum(0) if g is not None else None
    return dq, dk, dv, dg


DECODE_MAX_Q = 16  # query rows per (sequence, head) that the split-KV decode path takes (one tile)


def _decode_splits(n_programs: int, max_k: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) of the keys: ~2 programs per SM on a GPU; the interpreter uses chunks of two tiles."""
    n_tiles = max(1, triton.cdiv(max_k, block_n))
    if not on_gpu(device):
        want = triton.cdiv(n_tiles, 2)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        want = triton.cdiv(2 * sms, max(n_programs, 1))
    chunk = triton.cdiv(n_tiles, max(1, min(want, n_tiles))) * block_n
    return triton.cdiv(n_tiles * block_n, chunk), chunk


def _decode(q, k, v, g, cu_q, cu_k, kv_lens, max_q, max_k, causal, sm_scale):
    """Forward only, max_q <= DECODE_MAX_Q: split the keys over programs, then combine the partial softmaxes.
    Shapes as ``_fwd``; returns o (Nq, Hq, D)."""
    n_q, h_q, d = q.shape
    n_seq = cu_q.numel() - 1
    block_d = _block_d(d)
    block_n = 16 if not on_gpu(q.device) else (64 if block_d <= 128 else 32)
    n_split, chunk = _decode_splits(n_seq * h_q, max_k, block_n, q.device)
    o_part = torch.zeros((n_split, n_q, h_q, d), device=q.device, dtype=torch.float32)
    m_part = torch.full((n_split, h_q, n_q), float("-inf"), device=q.device)
    l_part = torch.zeros((n_split, h_q, n_q), device=q.device)
    launch(
        _gated_attn_decode_kernel,
        (n_split, h_q, n_seq),
        q,
        k,
        v,
        g if g is not None else l_part,
        o_part,
        m_part,
        l_part,
        cu_q,
        cu_k,
        kv_lens if kv_lens is not None else cu_q,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        g.stride(0) if g is not None else 0,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        m_part.stride(0),
        m_part.stride(1),
        chunk,
        sm_scale * LOG2E,
        GROUP=h_q // k.shape[1],
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=DECODE_MAX_Q,
        BLOCK_N=block_n,
        CAUSAL=causal,
        HAS_GATE=g is not None,
        HAS_KV_LENS=kv_lens is not None,
        **_dot_flags(q.dtype, q.device),
        num_warps=4 if on_gpu(q.device) else 1,
        num_stages=2 if on_gpu(q.device) else 1,
    )
    # combine (tiny: splits x Nq x Hq x D): rescale every chunk to the global row max (base 2)
    m = m_part.amax(0)
    w = torch.exp2(m_part - torch.where(torch.isinf(m), 0.0, m))  # chunks that saw no key: exp2(-inf) = 0
    l_sum = (w * l_part).sum(0)
    o = (w.transpose(1, 2)[..., None] * o_part).sum(0)
    o = o / torch.where(l_sum == 0, 1.0, l_sum).t()[..., None]  # rows with no key stay 0
    return o.to(q.dtype)


def plan_launches(q, k, v, g, bsz: int, t: int, causal: bool) -> None:
    """Forward and backward launches for bsz sequences of t tokens packed as q (bsz*t, Hq, D), g head-major
    (Hq, N) fp32 or None (for the compile report, on meta tensors inside ``launch.capture``)."""
    cu = torch.arange(0, (bsz + 1) * t, t, device=q.device, dtype=torch.int32)
    sm_scale = _scale(None, q.shape[-1])
    o, lse = _fwd(q, k, v, g, cu, cu, None, t, causal, sm_scale, False)
    _bwd(o, q, k, v, g, o, lse, cu, cu, None, t, t, causal, sm_scale, False)


# --------------------------------------------------------------------------------------------------------------
# Argument handling shared by the Triton path and the reference
# --------------------------------------------------------------------------------------------------------------
def _check(q, k, v, value_gate, cu_seqlens, kv_seqlens) -> None:
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    if q.dim() != want or k.dim() != want or v.dim() != want:
        layout = "packed (N, H, D) with cu_seqlens" if packed else "padded (B, T, H, D)"
        raise ValueError(
            f"gated_attention: expected {layout} q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"gated_attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"gated_attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them first "
            "(autocast does not reach into custom autograd Functions)"
        )
    if packed and q.shape[0] != k.shape[0]:
        raise ValueError("gated_attention: packed q and k/v must hold the same tokens (one cu_seqlens)")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"gated_attention: Hq={q.shape[-2]} is not a multiple of Hkv={k.shape[-2]}")
    if value_gate is not None and value_gate.shape != k.shape[:-2] + (q.shape[-2],):
        raise ValueError(
            f"gated_attention: value_gate must have shape {tuple(k.shape[:-2]) + (q.shape[-2],)} "
            f"(keys x query heads), got {tuple(value_gate.shape)}"
        )
    if kv_seqlens is not None and packed:
        raise ValueError("gated_attention: kv_seqlens is for the padded layout; packed input is unpadded already")


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------------------------
# torch.library custom ops: the one autograd path (training, tests and bench all call gated_attention)
# --------------------------------------------------------------------------------------------------------------
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


class GatedAttentionFunction:
    """Not a second autograd path: ``apply`` is the custom op ``gated_attention`` trains through (forward
    ``<ns>::gated_attention_fwd``, its registered backward ``<ns>::gated_attention_bwd``), with the positional
    order of the old ``autograd.Function``. Kept only for the package's export; call ``gated_attention``."""

    @staticmethod
    def apply(
        q, k, v, value_gate=None, causal=True, cu_seqlens=None, max_seqlen=None, softmax_scale=None, kv_seqlens=None
    ):
        scale = _scale(softmax_scale, q.shape[-1])
        return gated_attention_fwd(q, k, v, value_gate, cu_seqlens, kv_seqlens, causal, max_seqlen, scale)[0]


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
    """Gated attention (see module docstring). ``value_gate`` is the gate value g, (B, Tk, Hq) or (N, Hq).

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


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------
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
