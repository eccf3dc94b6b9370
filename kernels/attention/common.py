"""What every phase of gated attention shares: the Triton helpers that find a sequence's rows and load tiles, the
head-dim tile width, the dot flags, and the argument checks of the public function and the reference."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..launch import on_gpu

LOG2E = 1.4426950408889634


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
def _kv_sources(
    K, V, k_start, k_len, h_kv, stride_kt, stride_kh, stride_vt, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Where `_load_kv` reads one sequence's K and V rows of KV head h_kv: TMA descriptors, or pointers to the
    sequence's first row."""
    k_base = K + k_start * stride_kt + h_kv * stride_kh
    v_base = V + k_start * stride_vt + h_kv * stride_vh
    if TMA:
        k_base = _kv_descriptor(k_base, k_len, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_base = _kv_descriptor(v_base, k_len, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D)
    return k_base, v_base


@triton.jit
def _load_kv(
    src, start_n, offs_n, offs_d, stride, n_lim,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_N x BLOCK_D) K or V tile: one bulk copy through a descriptor (TMA), or pointer loads."""
    if TMA:
        t = src.load([start_n, 0])
    else:
        t = _load_rows(src, offs_n, offs_d, stride, n_lim, HEAD_DIM, BLOCK_D, MASK_ROWS)
    return t


@triton.jit
def _load_kv_block(
    k_src, v_src, start_n, offs_d, stride_kt, stride_vt, n_lim,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr,
    TMA: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Key block start_n: its row offsets, and its K and V tiles (`_load_kv`) in fp32 when the dots run in fp32."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_kv(k_src, start_n, offs_n, offs_d, stride_kt, n_lim, HEAD_DIM, BLOCK_D, MASK_ROWS, TMA)
    v = _load_kv(v_src, start_n, offs_n, offs_d, stride_vt, n_lim, HEAD_DIM, BLOCK_D, MASK_ROWS, TMA)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return offs_n, k, v


@triton.jit
def _load_q(Q, q_start, q_len, h, offs_m, offs_d, stride_qt, stride_qh, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """Head h's query tile, rows offs_m of the sequence (zeros past q_len; fp32 when the dots are), with the
    row offsets and mask that the output's store reuses."""
    row = (q_start + offs_m)[:, None].to(tl.int64)
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + row * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    return q, row, q_mask


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


def _block_d(head_dim: int) -> int:
    """Power-of-two tile width >= head_dim (tl.arange needs powers of two): 80 and 96 run as 128-wide tiles with
    masked loads (60% / 33% extra dot work, see docs/kernels.md)."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    return {
        "DOT_F32": not on_gpu(device) and dtype == torch.bfloat16,
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
    }


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
