"""Split-KV decode (flash-decoding) of gated attention: a few new queries against a long KV cache, forward only.

One tile of at most DECODE_MAX_Q query rows per (sequence, head); the keys are split into chunks over programs
(~2 per SM) so a single-token step fills the GPU, then the partial softmaxes are combined in PyTorch (tiny:
splits x Nq x Hq x D). The per-chunk loop is the forward's ``_fwd_inner`` with pointer loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import launch, on_gpu
from .common import LOG2E, _block_d, _dot_flags, _key_bounds, _load_q, _seq_info
from .forward import _fwd_inner
from .tiles import _sm_count


@triton.jit(do_not_specialize=["stride_gh", "stride_mh", "stride_ms", "chunk"])
def _gated_attn_decode_kernel(
    Q, K, V, G, OPART, MPART, LPART, CU_Q, CU_K, KV_LENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gh, stride_os, stride_ot, stride_oh,
    stride_ms, stride_mh,
    chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Split-KV decode (flash-decoding): the (<= BLOCK_M) query rows of one (sequence, head) against key chunk s;
    writes the unnormalised accumulator and the running max / sum, combined over the chunks afterwards."""
    s = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, diag = _seq_info(CU_Q, CU_K, KV_LENS, b, HAS_KV_LENS)
    h_kv = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, row, q_mask = _load_q(Q, q_start, q_len, h, offs_m, offs_d, stride_qt, stride_qh, HEAD_DIM, DOT_F32)
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    g_base = G + h * stride_gh + k_start
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _key_bounds(0, k_len, diag, BLOCK_M, BLOCK_N, CAUSAL)
    lo = s * chunk  # chunk and full_end are multiples of BLOCK_N: both ranges start on a tile
    end = lo + chunk
    # fmt: off
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, g_base, stride_kt, stride_vt, offs_m, offs_d, lo, tl.minimum(end, full_end),
        k_len, diag, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, False,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, g_base, stride_kt, stride_vt, offs_m, offs_d, tl.maximum(lo, full_end),
        tl.minimum(end, hi), k_len, diag, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_GATE, DOT_F32, DOT_PREC, False,
    )
    # fmt: on
    m_valid = offs_m < q_len
    tl.store(OPART + s.to(tl.int64) * stride_os + row * stride_ot + h * stride_oh + offs_d[None, :], acc, mask=q_mask)
    m_off = s.to(tl.int64) * stride_ms + h * stride_mh + q_start + offs_m
    tl.store(MPART + m_off, m_i, mask=m_valid)
    tl.store(LPART + m_off, l_i, mask=m_valid)


DECODE_MAX_Q = 16  # query rows per (sequence, head) that the split-KV decode path takes (one tile)


def _decode_splits(n_programs: int, max_k: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) of the keys: ~2 programs per SM on a GPU; the interpreter uses chunks of two tiles."""
    n_tiles = max(1, triton.cdiv(max_k, block_n))
    if not on_gpu(device):
        want = triton.cdiv(n_tiles, 2)
    else:
        want = triton.cdiv(2 * _sm_count(device), max(n_programs, 1))
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
    # fmt: off
    launch(
        _gated_attn_decode_kernel, (n_split, h_q, n_seq),
        q, k, v, g if g is not None else l_part, o_part, m_part, l_part, cu_q, cu_k,
        kv_lens if kv_lens is not None else cu_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0) if g is not None else 0, o_part.stride(0), o_part.stride(1), o_part.stride(2), m_part.stride(0),
        m_part.stride(1),
        chunk, sm_scale * LOG2E,
        GROUP=h_q // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=DECODE_MAX_Q, BLOCK_N=block_n, CAUSAL=causal,
        HAS_GATE=g is not None, HAS_KV_LENS=kv_lens is not None, **_dot_flags(q.dtype, q.device),
        num_warps=4 if on_gpu(q.device) else 1, num_stages=2 if on_gpu(q.device) else 1,
    )
    # fmt: on
    # combine (tiny: splits x Nq x Hq x D): rescale every chunk to the global row max (base 2)
    m = m_part.amax(0)
    w = torch.exp2(m_part - torch.where(torch.isinf(m), 0.0, m))  # chunks that saw no key: exp2(-inf) = 0
    l_sum = (w * l_part).sum(0)
    o = (w.transpose(1, 2)[..., None] * o_part).sum(0)
    o = o / torch.where(l_sum == 0, 1.0, l_sum).t()[..., None]  # rows with no key stay 0
    return o.to(q.dtype)
