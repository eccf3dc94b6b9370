"""The training forward (prefill) of gated attention: o and the base-2 row log-sum-exp.

Online softmax in base 2 (log2(e) folded into the scale), fp32 accumulators; only the row LSE (base 2, fp32,
head-major (Hq, N)) is saved for the backward. Key blocks fully inside the causal/length mask run an unmasked
specialisation; only the boundary blocks pay for the mask. The gate scales the columns of P (fp32, in registers)
before P V, so V goes from shared memory straight into the wgmma. Causal query blocks start longest first.

Three loops over the keys: K/V through TMA descriptors with the softmax overlapping the previous block's P V
(``_fwd_inner_overlap``, the default on Hopper at d64/d128), TMA in order, and pointer loads (``_fwd_inner``,
which the decode kernel reuses). ``tiles.py`` picks the tile and the loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import launch
from .common import (
    LOG2E,
    _block_d,
    _causal_block,
    _dot_flags,
    _key_bounds,
    _kv_sources,
    _load_kv_block,
    _load_q,
    _seq_info,
)
from .tiles import _configs, _fwd_tile, _use_tma


@triton.jit
def _softmax_step(
    qk, m_i, l_i, offs_m, offs_n, g_base, k_len, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
):  # fmt: skip
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
    acc, l_i, m_i, q, k_base, v_base, g_base,
    stride_kt, stride_vt,
    offs_m, offs_d, lo, hi, k_len, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) in order: S = Q K^T, softmax, O += P V. k_base / v_base: tensor descriptors when
    TMA, else pointers to the sequence's first row of the KV head."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_kv_block(
            k_base, v_base, start_n, offs_d, stride_kt, stride_vt, k_len, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, TMA, DOT_F32
        )  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p, alpha, m_i, l_i = _softmax_step(
            qk, m_i, l_i, offs_m, offs_n, g_base, k_len, diag, qk_scale, MASKED, CAUSAL, HAS_GATE
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_overlap(
    acc, l_i, m_i, qk, q, k_desc, v_desc, g_base, offs_m, lo, hi, k_len, diag, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
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


@triton.jit(do_not_specialize=["stride_gh", "stride_lh"])
def _gated_attn_fwd_kernel(
    Q, K, V, G, OUT, LSE, CU_Q, CU_K, KV_LENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gh, stride_ot, stride_oh, stride_lh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA: tl.constexpr, OVERLAP: tl.constexpr,
):  # fmt: skip
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
    q, row, q_mask = _load_q(Q, q_start, q_len, h, offs_m, offs_d, stride_qt, stride_qh, HEAD_DIM, DOT_F32)
    k_base, v_base = _kv_sources(
        K, V, k_start, k_len, h_kv, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_N, BLOCK_D, TMA
    )
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
        # fmt: off
        acc, l_i, m_i, qk = _fwd_inner_overlap(
            acc, l_i, m_i, qk, q, k_base, v_base, g_base, offs_m, 0, full_end, k_len, diag, qk_scale,
            BLOCK_N, False, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC,
        )
        acc, l_i, m_i, qk = _fwd_inner_overlap(
            acc, l_i, m_i, qk, q, k_base, v_base, g_base, offs_m, full_end, hi, k_len, diag, qk_scale,
            BLOCK_N, True, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC,
        )
        # fmt: on
    else:
        # fmt: off
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, g_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_end, k_len, diag,
            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, TMA,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, g_base, stride_kt, stride_vt, offs_m, offs_d, full_end, hi, k_len, diag,
            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, TMA,
        )
        # fmt: on
    empty = l_i == 0.0  # no visible key: output 0, LSE +inf so the backward sees P = 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(OUT + row * stride_ot + h * stride_oh + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


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
    cfg, overlap = _fwd_tile(_configs(block_d, q.dtype, q.device), tma)
    grid = (h_q, n_seq, triton.cdiv(max_q, cfg["BLOCK_M"]))
    # fmt: off
    launch(
        _gated_attn_fwd_kernel, grid,
        q, k, v, g if g is not None else lse, o, lse, cu_q, cu_k, kv_lens if kv_lens is not None else cu_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0) if g is not None else 0, o.stride(0), o.stride(1), lse.stride(0),
        sm_scale * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_GATE=g is not None,
        HAS_KV_LENS=kv_lens is not None, TMA=tma, OVERLAP=overlap, **_dot_flags(q.dtype, q.device), **cfg,
    )
    # fmt: on
    return o, lse
