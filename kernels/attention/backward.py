"""The backward of gated attention: delta, dK/dV, and dQ with the gate's gradient.

- delta = rowsum(O * dO) in a small preprocess kernel (head-major (Hq, N) fp32, like the LSE).
- dK/dV: one program per key block in the transposed orientation (keys are the rows of every dot: wgmma-sized),
  looping over the query heads of its KV group (GQA needs no atomics). It carries no gate accumulator, so gated
  and ungated dK/dV run the same tile. When the grid would not cover the SMs (few KV heads, e.g. SmolLM2's 3)
  the key tile halves (``tiles._dkdv_config``).
- dQ: one program per query block (longest causal blocks first), and the gate's gradient
  dg[j, h] = sum_i P[i, j] * (dO[i] . v[j]) (UNgated V; dP = g * (dO V^T)): the dQ loop has P and dO V^T in
  registers, so it writes their column sums as one fp32 partial row per (query block, head), summed once
  afterwards. Deterministic (no atomics).

Caveat: the gate-gradient partials take cdiv(max_seqlen, BLOCK_M) x Hq x Nk x 4 bytes (8 MB at 2 x 2048, 32
heads; they grow with the square of the sequence length: ~1 GB at one 32k sequence). An opt-in atomic variant is
not written yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import launch, on_gpu
from .common import LOG2E, _block_d, _causal_block, _dot_flags, _key_bounds, _kv_sources, _load_kv_block, _seq_info
from .tiles import _configs, _dkdv_config, _dq_tile, _use_tma


@triton.jit(do_not_specialize=["n_rows", "stride_dh"])
def _bwd_delta_kernel(
    O, DO, DELTA,
    n_rows, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
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
def _load_q_rows(
    Q, DO, LSE, DELTA, q_start, q_len, h, offs_m, offs_d,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
    HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Query rows offs_m of head h as both backward kernels read them: the Q and dO tiles (fp32 when the dots
    are), the rows' LSE and delta, and the row offsets / tile mask that the dQ store reuses. Rows past q_len load
    zeros: their dO and delta are 0, so they add nothing even unmasked."""
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
    return q, do, lse, delta, row, q_mask


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, g,
    Q, DO, G, LSE, DELTA,
    q_start, h_kv, krow, n_valid,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_gh, stride_lh,
    offs_n, offs_d, lo, hi, q_len, diag, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
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
        q, do, lse, delta, row, q_mask = _load_q_rows(
            Q, DO, LSE, DELTA, q_start, q_len, h, offs_m, offs_d,
            stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, HEAD_DIM, DOT_F32,
        )  # fmt: skip
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
    Q, K, V, G, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, KV_LENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gh, stride_dot, stride_doh, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
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
    # fmt: off
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, g,
        Q, DO, G, LSE, DELTA, q_start, h_kv, krow, n_valid, stride_qt, stride_qh, stride_dot, stride_doh, stride_gh,
        stride_lh, offs_n, offs_d, lo, mid, q_len, diag, qk_scale, GROUP, HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_GATE,
        DOT_F32, DOT_PREC,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, g,
        Q, DO, G, LSE, DELTA, q_start, h_kv, krow, n_valid, stride_qt, stride_qh, stride_dot, stride_doh, stride_gh,
        stride_lh, offs_n, offs_d, mid, q_end, q_len, diag, qk_scale, GROUP, HEAD_DIM, BLOCK_M, False, CAUSAL, HAS_GATE,
        DOT_F32, DOT_PREC,
    )
    # fmt: on
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
    dq, q, do, lse, delta, k_base, v_base, g_base, dg_base,
    stride_kt, stride_vt,
    offs_m, offs_d, lo, hi, k_len, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """dQ += dS K over the key blocks; with a gate also the gate's gradient of this query block,
    dg_j = sum_i P_ij (dO_i . v_j): the column sums of P * (dO V^T) (UNgated), both already in registers.
    k_base / v_base: tensor descriptors when TMA, else pointers (as in the forward)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_kv_block(
            k_base, v_base, start_n, offs_d, stride_kt, stride_vt, k_len, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, TMA, DOT_F32
        )  # fmt: skip
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
    Q, K, V, G, DO, LSE, DELTA, DQ, DGP, CU_Q, CU_K, KV_LENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gh, stride_dot, stride_doh, stride_lh,
    stride_dqt, stride_dqh, stride_gp,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
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
    q, do, lse, delta, row, q_mask = _load_q_rows(
        Q, DO, LSE, DELTA, q_start, q_len, h, offs_m, offs_d,
        stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, HEAD_DIM, DOT_F32,
    )  # fmt: skip
    k_base, v_base = _kv_sources(
        K, V, k_start, k_len, h_kv, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_N, BLOCK_D, TMA
    )
    g_base = G + h * stride_gh + k_start
    dg_base = DGP + m_block.to(tl.int64) * stride_gp + h * stride_gh + k_start
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_bounds(start_m, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)
    # fmt: off
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, g_base, dg_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_end,
        k_len, diag, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, TMA,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, g_base, dg_base, stride_kt, stride_vt, offs_m, offs_d, full_end, hi,
        k_len, diag, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, TMA,
    )
    # fmt: on
    dq = dq * sm_scale
    tl.store(DQ + row[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


def _delta(o, do, block_d):
    """rowsum(O * dO) per (head, row), head-major (Hq, N) fp32, in one small kernel."""
    n, h_q, d = o.shape
    delta = torch.empty((h_q, n), device=o.device, dtype=torch.float32)
    block_t = 16 if not on_gpu(o.device) else max(16, min(128, 8192 // block_d))
    # fmt: off
    launch(
        _bwd_delta_kernel, (triton.cdiv(n, block_t), h_q),
        o, do, delta, n,
        o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4 if on_gpu(o.device) else 1,
    )
    # fmt: on
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
    dq_cfg = _dq_tile(cfgs, tma)
    n_mblocks = triton.cdiv(max_q, dq_cfg["BLOCK_M"])
    # the gate's gradient: one fp32 partial row per (dQ query block, head), zero where a block sees no key,
    # summed below; deterministic (no atomics) at cdiv(max_q, BLOCK_M) x Hq x Nk x 4 bytes
    dg_part = torch.zeros((n_mblocks, h_q, k.shape[0]), device=q.device) if g is not None else None
    g_arg = g if g is not None else lse
    kv_arg = kv_lens if kv_lens is not None else cu_q
    # fmt: off
    flags = dict(
        GROUP=h_q // h_kv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_GATE=g is not None,
        HAS_KV_LENS=kv_lens is not None, **_dot_flags(q.dtype, q.device),
    )
    common = (  # the strides both kernels take, in their argument order
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0) if g is not None else 0, do.stride(0), do.stride(1), lse.stride(0),
    )
    launch(
        _gated_attn_bwd_dkdv_kernel, (h_kv, n_seq, triton.cdiv(max_k, dkdv["BLOCK_N"])),
        q, k, v, g_arg, do, lse, delta, dk, dv, cu_q, cu_k, kv_arg, *common,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        sm_scale * LOG2E, sm_scale,
        **flags, **dkdv,
    )
    launch(
        _gated_attn_bwd_dq_kernel, (h_q, n_seq, n_mblocks),
        q, k, v, g_arg, do, lse, delta, dq, dg_part if g is not None else lse, cu_q, cu_k, kv_arg, *common,
        dq.stride(0), dq.stride(1), dg_part.stride(0) if g is not None else 0,
        sm_scale * LOG2E, sm_scale,
        TMA=tma, **flags, **dq_cfg,
    )
    # fmt: on
    dg = dg_part.sum(0) if g is not None else None
    return dq, dk, dv, dg
