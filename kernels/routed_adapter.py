"""Fused modality-routed SwiGLU adapter (PILL's MoMAE experts and the shared attention adapter).

Paper: PILL (arXiv 2311.02126), "Mixture-of-Modality-Adapter-Expert" with SwiGLU adapters:

    y[t] = x[t] + U_e (SiLU(D1_e x[t]) * (D2_e x[t]))        e = route[t];  D1 = w_gate, D2 = w_down, U = w_up

Design choices
- Memory-bound op (r = 32 << d = 4096): judged in GB/s. Tokens are grouped by expert once (a stable argsort of
  ``route`` plus per-expert offsets on the device, no host sync: ``build_route_schedule``, reusable across the
  layers of one forward); each token block of BLOCK_M tokens belongs to ONE expert, so every token computes only
  its own expert.
- One HBM pass per direction (issue 20; ``python -m kernels.bench --compile-report`` models the bytes). Forward:
  one program per 16-token block computes hg | hd = x [D1; D2]^T over all of d, then y = x + a U^T d-tile by
  d-tile; its second read of its own rows hits L2 (16 rows x d x 2 B = 128 KB per block; all resident blocks
  of an H100 fit its 50 MB L2), so x comes from HBM once and no partial sums exist. Backward: pass 1, per token
  block, dA = dy U over all of d and the per-token a, dhg | dhd (N, 3r: tiny); pass 2, per (d-tile, expert,
  token split), the three weight-gradient tiles and dx from the same x and dy tiles. dy is read twice (dA needs
  all of d before any dx or dW tile can start), x once; the compile report sets this against the minimum.
- Compute dtype: the fp32 master weights are cast to the activation dtype ([D1; D2] and U^T, what
  ``torch.autocast`` does to F.linear) once per optimizer step for the same weights (``_weights``: keyed on
  the memory they view, their data_ptr and version counter, in the per-step ``weight_cache``); the forward and
  the backward of a call, and every later call on the same weights or views of them, share the copy.
  Accumulation, SiLU, the product and the residual add are fp32, y is written in x's dtype. fp32 activations
  use IEEE fp32 dots. Under the Triton interpreter everything runs in fp32 (its bf16 ``tl.dot`` is wrong).
  Weight gradients are fp32 (the weights are fp32 master weights).
- Weight gradients: tokens of expert e only ever add to expert e. With more than one token split per expert
  the partial sums meet through fp32 atomics (non-deterministic summation order on GPU; one split,
  deterministic, in the interpreter).
- Works unrouted: E = 1 with ``route`` all zeros is the shared attention adapter.

Caveats
- ``route`` values must lie in [0, E); out-of-range values are not checked on the device (indexing error).
- The weight cache only hits when the caller passes the same tensors or views of the same memory: pipeline/
  model/adapters.py stacks the experts' weights once per optimizer step and passes views of that stack, so every
  forward of a step (micro-batches, checkpoint recomputation) and its backward share one copy.
- Triton runs when tensors are on CUDA, or when TRITON_INTERPRET=1 was set before import; otherwise the
  reference. Tile sizes for the GPU are checked with the compile report, not timed (no GPU here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import weight_cache
from .launch import capture, launch, on_gpu

H100_SMS = 132  # SM count the launchers plan for when they only plan (meta tensors, compile report)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _block_tokens(PERM, OFFS, pid, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert of token block pid and the token ids (rows of x) it owns; e == NUM_EXPERTS means no work.
    Blocks are laid out expert after expert, BLOCK_M tokens each (the last block of an expert may be partial)."""
    e = pid * 0 + NUM_EXPERTS  # tensors from the start: compiled Triton rejects loop-carried type changes
    t0 = pid * 0
    t1 = pid * 0
    first = pid * 0
    cum = pid * 0
    for i in range(NUM_EXPERTS):
        lo = tl.load(OFFS + i)
        hi = tl.load(OFFS + i + 1)
        nb = tl.cdiv(hi - lo, BLOCK_M)
        hit = (pid >= cum) & (pid < cum + nb)
        e = tl.where(hit, i, e)
        t0 = tl.where(hit, lo, t0)
        t1 = tl.where(hit, hi, t1)
        first = tl.where(hit, cum, first)
        cum += nb
    idx = t0 + (pid - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = idx < t1
    rows = tl.load(PERM + idx, mask=valid, other=0).to(tl.int64)
    return e, tl.minimum(e, NUM_EXPERTS - 1).to(tl.int64), rows, valid


@triton.jit
def _routed_adapter_fwd_kernel(
    X, Y, W, WUT, H, PERM, OFFS,
    stride_x, stride_y,
    D, R,
    NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    COMPUTE_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The whole forward of one token block in one program: hg | hd = x [D1; D2]_e^T over all of d (written
    (N, 2r) fp32 for the backward), a = SiLU(hg) * hd in registers, then y = x + a U_e^T d-tile by d-tile. The
    second pass re-reads the block's own rows right after the first: BLOCK_M is small enough (16 rows x d) that
    every resident block's rows stay in L2, so x comes from HBM once."""
    pid = tl.program_id(0)
    e, e_i, rows, valid = _block_tokens(PERM, OFFS, pid, NUM_EXPERTS, BLOCK_M)
    if e >= NUM_EXPERTS:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    w_base = W + e_i * 2 * R * D  # W = [D1; D2] (E, 2r, d)
    hg = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    hd = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
        w_off = offs_r[:, None] * D + cols[None, :]
        w_mask = r_ok[:, None] & c_ok[None, :]
        wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
        wd = tl.load(w_base + R * D + w_off, mask=w_mask, other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
            wd = wd.to(tl.float32)
        hg = tl.dot(x, tl.trans(wg), hg, input_precision=DOT_PREC)
        hd = tl.dot(x, tl.trans(wd), hd, input_precision=DOT_PREC)
    h_off = rows[:, None] * (2 * R) + offs_r[None, :]
    h_mask = valid[:, None] & r_ok[None, :]
    tl.store(H + h_off, hg, mask=h_mask)
    tl.store(H + h_off + R, hd, mask=h_mask)
    a = hg * tl.sigmoid(hg) * hd  # SiLU(D1 x) * D2 x, fp32
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        xy_mask = valid[:, None] & c_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=xy_mask, other=0.0)
        # U_e^T is stored (E, r, d): the (BLOCK_D, BLOCK_R) tile of U_e
        wu = tl.load(
            WUT + e_i * R * D + offs_r[None, :] * D + cols[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0
        )
        if COMPUTE_F32:
            wu = wu.to(tl.float32)
        y = tl.dot(a.to(wu.dtype), tl.trans(wu), x.to(tl.float32), input_precision=DOT_PREC)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=xy_mask)


@triton.jit
def _routed_adapter_bwd_dh_kernel(
    DY, WUT, H, A, DH, PERM, OFFS,
    stride_dy, D, R,
    NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    COMPUTE_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """First backward pass, one token block per program: dA = dy U_e over all of d (no partials), then what the
    second pass needs in the activation dtype: a = SiLU(hg) hd (N, r) and dhg | dhd (N, 2r)."""
    pid = tl.program_id(0)
    e, e_i, rows, valid = _block_tokens(PERM, OFFS, pid, NUM_EXPERTS, BLOCK_M)
    if e >= NUM_EXPERTS:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    da = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
        wu = tl.load(
            WUT + e_i * R * D + offs_r[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0
        )  # U_e^T (r, d) tile
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
            wu = wu.to(tl.float32)
        da = tl.dot(dy, tl.trans(wu), da, input_precision=DOT_PREC)
    h_mask = valid[:, None] & r_ok[None, :]
    h_off = rows[:, None] * (2 * R) + offs_r[None, :]
    hg = tl.load(H + h_off, mask=h_mask, other=0.0)
    hd = tl.load(H + h_off + R, mask=h_mask, other=0.0)
    sig = tl.sigmoid(hg)
    dhd = da * hg * sig
    dhg = da * hd * sig * (1.0 + hg * (1.0 - sig))  # d SiLU(h) / dh = s (1 + h (1 - s))
    tl.store(A + rows[:, None] * R + offs_r[None, :], (hg * sig * hd).to(A.dtype.element_ty), mask=h_mask)
    tl.store(DH + h_off, dhg.to(DH.dtype.element_ty), mask=h_mask)
    tl.store(DH + h_off + R, dhd.to(DH.dtype.element_ty), mask=h_mask)


@triton.jit
def _routed_adapter_bwd_dw_kernel(
    X, DY, DX, W, A, DH, DWG, DWD, DWU, PERM, OFFS,
    stride_x, stride_dy, stride_dx,
    D, R,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Second backward pass, per (d-tile, expert, token split): over that expert's tokens only, the weight
    gradients as (BLOCK_D, r) tiles (d is the wgmma row dimension): dU = dy^T a, dD1^T = x^T dhg, dD2^T = x^T dhd,
    and dx = dy + dhg D1_e + dhd D2_e on the same tiles of dy: x and dy are read once here."""
    d0 = tl.program_id(0) * BLOCK_D
    e = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    t0 = tl.load(OFFS + e)
    t1 = tl.load(OFFS + e + 1)
    chunk = tl.cdiv(tl.cdiv(t1 - t0, SPLIT), BLOCK_M) * BLOCK_M
    lo = t0 + split * chunk
    hi = tl.minimum(lo + chunk, t1)
    offs_r = tl.arange(0, BLOCK_R)
    cols = d0 + tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    c_ok = cols < D
    dwu = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)
    dwg = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)
    dwd = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)
    w_off = e * 2 * R * D + offs_r[:, None] * D + cols[None, :]  # W = [D1; D2] (E, 2r, d): this d-tile, once
    w_mask = r_ok[:, None] & c_ok[None, :]
    wg = tl.load(W + w_off, mask=w_mask, other=0.0)
    wd = tl.load(W + w_off + R * D, mask=w_mask, other=0.0)
    if COMPUTE_F32:
        wg = wg.to(tl.float32)
        wd = wd.to(tl.float32)
    for s in range(lo, hi, BLOCK_M):  # only tokens routed to expert e
        idx = s + tl.arange(0, BLOCK_M)
        valid = idx < hi
        rows = tl.load(PERM + idx, mask=valid, other=0).to(tl.int64)
        xy_mask = valid[:, None] & c_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=xy_mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=xy_mask, other=0.0)
        h_mask = valid[:, None] & r_ok[None, :]
        a = tl.load(A + rows[:, None] * R + offs_r[None, :], mask=h_mask, other=0.0)
        dh_off = rows[:, None] * (2 * R) + offs_r[None, :]
        dhg = tl.load(DH + dh_off, mask=h_mask, other=0.0)
        dhd = tl.load(DH + dh_off + R, mask=h_mask, other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
            a = a.to(tl.float32)
            dhg = dhg.to(tl.float32)
            dhd = dhd.to(tl.float32)
        dwu = tl.dot(tl.trans(dy), a, dwu, input_precision=DOT_PREC)
        dwg = tl.dot(tl.trans(x), dhg, dwg, input_precision=DOT_PREC)
        dwd = tl.dot(tl.trans(x), dhd, dwd, input_precision=DOT_PREC)
        dx = tl.dot(dhg.to(wg.dtype), wg, dy.to(tl.float32), input_precision=DOT_PREC)
        dx = tl.dot(dhd.to(wd.dtype), wd, dx, input_precision=DOT_PREC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=xy_mask)
    t_off = e * R * D + offs_r[None, :] * D + cols[:, None]  # dD1, dD2 are (E, r, d): store the tile transposed
    u_off = e * D * R + cols[:, None] * R + offs_r[None, :]
    mask = c_ok[:, None] & r_ok[None, :]
    if SPLIT == 1:
        tl.store(DWG + t_off, dwg, mask=mask)
        tl.store(DWD + t_off, dwd, mask=mask)
        tl.store(DWU + u_off, dwu, mask=mask)
    else:
        tl.atomic_add(DWG + t_off, dwg, mask=mask)
        tl.atomic_add(DWD + t_off, dwd, mask=mask)
        tl.atomic_add(DWU + u_off, dwu, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteSchedule:
    """Tokens grouped by expert, built once per model forward and shared by every layer (the route is the same
    in all of them): pass it as ``route`` to ``routed_swiglu_adapter``.

    route: the (...) expert index per token it was built from (the reference path uses it);
    perm (N,) int32: token ids, expert after expert (stable); offs (E+1,) int32: each expert's first index."""

    route: torch.Tensor
    perm: torch.Tensor
    offs: torch.Tensor
    num_experts: int


def build_route_schedule(route: torch.Tensor, num_experts: int) -> RouteSchedule:
    """Stable argsort of the route and per-expert offsets, on the route's device without a host sync."""
    if route.dtype.is_floating_point or route.dtype.is_complex:
        raise ValueError(f"build_route_schedule: route must be an integer (or bool) tensor, got {route.dtype}")
    flat = route.reshape(-1).to(torch.int64)
    perm = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=route.device).scatter_add(
        0, flat, torch.ones_like(flat)
    )
    offs = torch.zeros(num_experts + 1, dtype=torch.int32, device=route.device)
    offs[1:] = torch.cumsum(counts, 0)
    return RouteSchedule(route, perm, offs, num_experts)


def _config(d: int, r: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    block_r = max(16, triton.next_power_of_2(r))
    block_d = max(16, triton.next_power_of_2(d))
    if not on_gpu(device):  # interpreter: few, small programs
        return {"BLOCK_M": 16, "BLOCK_D": min(64, block_d), "BLOCK_R": block_r, "num_warps": 1}
    if dtype == torch.float32:  # IEEE fp32 dots on CUDA cores (a correctness path): smaller tiles
        return {"BLOCK_M": 32, "BLOCK_D": min(64, block_d), "BLOCK_R": block_r, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_D": min(128, block_d), "BLOCK_R": block_r, "num_warps": 4}


def _fwd_config(d: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The fused forward: 16-token blocks on a GPU, so that the rows of every resident block (16 x d x 2 B =
    128 KB at d 4096, two blocks per SM: 34 MB on an H100) stay in its 50 MB L2 between the two passes, and 2k
    tokens still give ~130 programs."""
    cfg = _config(d, r, device, dtype)
    return cfg if not on_gpu(device) else cfg | {"BLOCK_M": 16}


def _dw_config(d: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The second backward pass holds three (BLOCK_D, r) fp32 accumulators plus the dx tile: 8 warps on a GPU
    keep it at 0 spill under Triton 3.6 too (4 warps: 255 registers and an 8 B spill there)."""
    cfg = _config(d, r, device, dtype)
    return cfg if not on_gpu(device) or dtype == torch.float32 else cfg | {"num_warps": 8}


def _flags(x: torch.Tensor) -> dict:
    f32 = not on_gpu(x.device) or x.dtype == torch.float32
    return {"COMPUTE_F32": f32, "DOT_PREC": "ieee" if f32 else "tf32"}


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS


def _dw_split(n: int, num_experts: int, n_dtiles: int, block_m: int, device: torch.device) -> int:
    """Token splits per (d-tile, expert) of the weight-gradient kernel: ~4 programs per SM on a GPU, else 1."""
    if not on_gpu(device):
        return 1
    return max(1, min(triton.cdiv(n, block_m * num_experts), 4 * _sms(device) // (n_dtiles * num_experts)))


def _cast(w_gate, w_down, w_up, dtype):
    """[D1; D2] (E, 2r, d) and U^T (E, r, d) in the compute dtype: one copy each (cat writes the dtype directly)."""
    w_cat = (
        torch.cat([w_gate.to(dtype), w_down.to(dtype)], dim=1)
        if dtype != w_gate.dtype
        else torch.cat([w_gate, w_down], dim=1)
    )
    w_ut = w_up.to(dtype).transpose(1, 2).contiguous()
    return w_cat, w_ut


def _weights(w_gate, w_down, w_up, dtype):
    """The compute-dtype copies of the weights, cast once per optimizer step for the same weights (the forward,
    the backward, and every further call on views of the same memory within the step share one copy).

    Keyed on the memory the weights view (each storage's id, offset, shape, strides, dtype; the compute dtype),
    not on the tensor objects: pipeline/model/adapters.py passes each call a fresh view of its per-step stacked
    weights (an autograd node per call), and activation checkpointing hands the backward a detached alias; all of
    them read the same storage and share its version counter, so they share one copy (weight_cache.py)."""
    ws = (w_gate, w_down, w_up)
    if w_gate.device.type == "meta" or torch.is_inference_mode_enabled():
        return _cast(*ws, dtype)
    stores = tuple(w.untyped_storage() for w in ws)
    key = (*((id(st), w.storage_offset(), w.shape, w.stride(), w.dtype) for st, w in zip(stores, ws)), dtype)
    return weight_cache.per_step("cast", key, stores, ws, lambda: _cast(*ws, dtype))


def _forward(x2, sched, w_cat, w_ut):
    """x2 (N, d) -> y (N, d) and the saved pre-activations hg | hd (N, 2r) fp32: one launch, x from HBM once."""
    num_experts, r, d = w_ut.shape
    n = x2.shape[0]
    cfg = _fwd_config(d, r, x2.device, x2.dtype)
    y = torch.empty_like(x2)
    h = torch.empty((n, 2 * r), device=x2.device, dtype=torch.float32)
    if n > 0:
        n_blocks = triton.cdiv(n, cfg["BLOCK_M"]) + num_experts  # upper bound on per-expert blocks
        # fmt: off
        launch(
            _routed_adapter_fwd_kernel, (n_blocks,),
            x2, y, w_cat, w_ut, h, sched.perm, sched.offs,
            x2.stride(0), y.stride(0),
            d, r,
            NUM_EXPERTS=num_experts, **cfg, **_flags(x2),
        )
        # fmt: on
    return y, h


def _backward(dy2, x2, sched, w_cat, w_ut, h):
    """Two passes: dA = dy U per token block (dy's first read), then per d-tile and expert the weight gradients
    and dx together (x and dy's second read)."""
    num_experts, r, d = w_ut.shape
    n = x2.shape[0]
    cfg = _fwd_config(d, r, x2.device, x2.dtype)
    flags = _flags(x2)
    dx = torch.empty_like(x2)
    dwg = torch.zeros((num_experts, r, d), device=x2.device, dtype=torch.float32)
    dwd = torch.zeros_like(dwg)
    dwu = torch.zeros((num_experts, d, r), device=x2.device, dtype=torch.float32)
    if n > 0:
        act_dtype = torch.float32 if flags["COMPUTE_F32"] else x2.dtype
        a = torch.empty((n, r), device=x2.device, dtype=act_dtype)
        dh = torch.empty((n, 2 * r), device=x2.device, dtype=act_dtype)
        n_blocks = triton.cdiv(n, cfg["BLOCK_M"]) + num_experts  # upper bound on per-expert blocks
        # fmt: off
        launch(
            _routed_adapter_bwd_dh_kernel, (n_blocks,),
            dy2, w_ut, h, a, dh, sched.perm, sched.offs,
            dy2.stride(0),
            d, r,
            NUM_EXPERTS=num_experts, **cfg, **flags,
        )
        # fmt: on
        cfg = _dw_config(d, r, x2.device, x2.dtype)
        n_dtiles = triton.cdiv(d, cfg["BLOCK_D"])
        split = _dw_split(n, num_experts, n_dtiles, cfg["BLOCK_M"], x2.device)
        # fmt: off
        launch(
            _routed_adapter_bwd_dw_kernel, (n_dtiles, num_experts, split),
            x2, dy2, dx, w_cat, a, dh, dwg, dwd, dwu, sched.perm, sched.offs,
            x2.stride(0), dy2.stride(0), dx.stride(0),
            d, r,
            SPLIT=split, **cfg, **flags,
        )
        # fmt: on
    return dx, dwg, dwd, dwu


def plan_launches(x2: torch.Tensor, w_rd: torch.Tensor, w_dr: torch.Tensor) -> dict:
    """Forward and backward launches for x2 (N, d) with E = w_rd.shape[0] experts, tokens split evenly, on meta
    tensors (the compile report): {"fwd" | "bwd": (launches, bytes its torch-side ops move per call)}."""
    num_experts, r, d = w_rd.shape
    n = x2.shape[0]
    perm = torch.empty(n, device=x2.device, dtype=torch.int32)
    offs = torch.empty(num_experts + 1, device=x2.device, dtype=torch.int32)
    sched = RouteSchedule(perm, perm, offs, num_experts)
    elt = x2.element_size()
    # the compute-dtype weight copies: .to per weight (fp32 in, elt out), cat / transpose-copy (elt in and out);
    # cast once per optimizer step for the same weights: the first forward of a step pays it, its backward and
    # every later forward of the step (gradient-accumulation micro-batches, checkpoint recomputation) hit the
    # cache and move 0, so with k forwards of a layer per step a call moves copies / k on average. The model's
    # stacking of the experts' fp32 weights (pipeline/model/adapters.py: 3 x 8 B per weight element, per call
    # before, uncounted here) is also once per step now.
    copies = num_experts * r * d * (3 * (4 + elt) + 3 * 2 * elt)

    with capture() as fwd:
        w_cat, w_ut = _cast(w_rd, w_rd, w_dr, x2.dtype)
        y, h = _forward(x2, sched, w_cat, w_ut)
    with capture() as bwd:
        _backward(y, x2, sched, w_cat, w_ut, h)
    return {"fwd": (fwd, copies), "bwd": (bwd, 0)}


def _as_schedule(route, num_experts: int, device: torch.device) -> RouteSchedule:
    if isinstance(route, RouteSchedule):
        if route.num_experts != num_experts:
            raise ValueError(
                f"routed_swiglu_adapter: the route schedule was built for {route.num_experts} experts, "
                f"the weights have {num_experts}"
            )
        return route
    return build_route_schedule(route.to(device), num_experts)


def _check(x, route, w_gate, w_down, w_up) -> None:
    if w_gate.dim() != 3 or w_gate.shape != w_down.shape:
        raise ValueError(
            f"routed_swiglu_adapter: w_gate/w_down must be (E, r, d) alike, got {tuple(w_gate.shape)}, "
            f"{tuple(w_down.shape)}"
        )
    num_experts, r, d = w_gate.shape
    if w_up.shape != (num_experts, d, r):
        raise ValueError(f"routed_swiglu_adapter: w_up must be {(num_experts, d, r)}, got {tuple(w_up.shape)}")
    if x.shape[-1] != d or route.shape != x.shape[:-1]:
        raise ValueError(
            f"routed_swiglu_adapter: x (..., {d}) and route (...) must match, got x {tuple(x.shape)}, "
            f"route {tuple(route.shape)}"
        )
    if route.dtype.is_floating_point or route.dtype.is_complex:
        raise ValueError(f"routed_swiglu_adapter: route must be an integer (or bool) tensor, got {route.dtype}")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")


def routed_swiglu_adapter(
    x: torch.Tensor, route: torch.Tensor | RouteSchedule, w_gate: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> torch.Tensor:
    """x + w_up[e] @ (silu(w_gate[e] @ x) * (w_down[e] @ x)) with e = route per token (see module docstring).

    ``route`` may be a ``RouteSchedule`` from ``build_route_schedule(route, E)``: built once per model forward,
    it saves the grouping (argsort + offsets) in every layer."""
    if _use_triton(x):
        return _triton_adapter(x, route, w_gate, w_down, w_up)
    return routed_swiglu_adapter_ref(x, route, w_gate, w_down, w_up)


def _triton_adapter(x, route, w_gate, w_down, w_up):
    """The Triton path through the registered custom op (one node for torch.compile)."""
    sched = _as_schedule(route, w_gate.shape[0], x.device)
    return routed_swiglu_adapter_fwd(x, sched.route, sched.perm, sched.offs, w_gate, w_down, w_up)[0]


# --------------------------------------------------------------------------------------------------------------
# torch.library custom op: the one autograd path (the public function, training, tests, bench)
# --------------------------------------------------------------------------------------------------------------
NS = __name__.split(".")[0]  # the package's import name: `pill_kernels` installed, `kernels` from the repo root


@torch.library.custom_op(f"{NS}::routed_swiglu_adapter_fwd", mutates_args=())
def routed_swiglu_adapter_fwd(
    x: torch.Tensor,
    route: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w_gate: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y like x, the pre-activations hg | hd (N, 2r) fp32; empty on the reference path). perm / offs: the
    RouteSchedule of ``route``."""
    _check(x, route, w_gate, w_down, w_up)
    if not _use_triton(x):
        y = routed_swiglu_adapter_ref(x, route, w_gate, w_down, w_up).contiguous()
        return y, x.new_empty((0,), dtype=torch.float32)
    sched = RouteSchedule(route, perm, offs, w_gate.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_cat, w_ut = _weights(w_gate, w_down, w_up, torch.float32 if _flags(x2)["COMPUTE_F32"] else x.dtype)
    y, h = _forward(x2, sched, w_cat, w_ut)
    return y.view(x.shape), h


@routed_swiglu_adapter_fwd.register_fake
def _(x, route, perm, offs, w_gate, w_down, w_up):
    n = x.numel() // x.shape[-1]
    h_shape = (n, 2 * w_gate.shape[1]) if _use_triton(x) else (0,)
    return x.new_empty(x.shape), x.new_empty(h_shape, dtype=torch.float32)


@torch.library.custom_op(f"{NS}::routed_swiglu_adapter_bwd", mutates_args=())
def routed_swiglu_adapter_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    route: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w_gate: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    h: torch.Tensor,
) -> list[torch.Tensor]:
    """-> [dx, dw_gate, dw_down, dw_up]."""
    if not _use_triton(x):
        leaves = [t.detach().requires_grad_() for t in (x, w_gate, w_down, w_up)]
        with torch.enable_grad():
            ref = routed_swiglu_adapter_ref(leaves[0], route, *leaves[1:])
            return [t.contiguous() for t in torch.autograd.grad(ref, leaves, dy)]
    sched = RouteSchedule(route, perm, offs, w_gate.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_cat, w_ut = _weights(w_gate, w_down, w_up, torch.float32 if _flags(x2)["COMPUTE_F32"] else x.dtype)
    dx, dwg, dwd, dwu = _backward(dy.reshape(x2.shape).contiguous(), x2, sched, w_cat, w_ut, h)
    return [dx.view(x.shape), dwg.to(w_gate.dtype), dwd.to(w_down.dtype), dwu.to(w_up.dtype)]


@routed_swiglu_adapter_bwd.register_fake
def _(dy, x, route, perm, offs, w_gate, w_down, w_up, h):
    return [
        x.new_empty(x.shape),
        w_gate.new_empty(w_gate.shape),
        w_down.new_empty(w_down.shape),
        w_up.new_empty(w_up.shape),
    ]


def _adapter_setup(ctx, inputs, output):
    x, route, perm, offs, w_gate, w_down, w_up = inputs
    ctx.save_for_backward(x, route, perm, offs, w_gate, w_down, w_up, output[1])


def _adapter_backward(ctx, dy, _dh):
    x, route, perm, offs, w_gate, w_down, w_up, h = ctx.saved_tensors
    dx, dwg, dwd, dwu = routed_swiglu_adapter_bwd(dy.contiguous(), x, route, perm, offs, w_gate, w_down, w_up, h)
    return dx, None, None, None, dwg, dwd, dwu


routed_swiglu_adapter_fwd.register_autograd(_adapter_backward, setup_context=_adapter_setup)


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------
def routed_swiglu_adapter_ref(
    x: torch.Tensor, route: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> torch.Tensor:
    """PILL's formulation: every expert on every token, then select per token. Computes in x's dtype (weights cast
    like autocast does); call it on fp32 x for the gold reference."""
    route = route.route if isinstance(route, RouteSchedule) else route
    _check(x, route, w_gate, w_down, w_up)
    wg, wd, wu = (w.to(x.dtype) for w in (w_gate, w_down, w_up))
    hg = torch.einsum("...d,erd->...er", x, wg)
    hd = torch.einsum("...d,erd->...er", x, wd)
    out = torch.einsum("...er,edr->...ed", F.silu(hg) * hd, wu)  # (..., E, d): every expert's output
    sel = route.to(device=x.device, dtype=torch.int64)[..., None, None].expand(*route.shape, 1, x.shape[-1])
    return x + torch.gather(out, -2, sel).squeeze(-2)


def routed_swiglu_adapter_eager(
    x: torch.Tensor, route: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> torch.Tensor:
    """Routed eager baseline: gather each expert's tokens, run only that expert, scatter back (host syncs)."""
    route = route.route if isinstance(route, RouteSchedule) else route
    _check(x, route, w_gate, w_down, w_up)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    r2 = route.reshape(-1).to(x.device)
    y = x2.clone()
    for e in range(w_gate.shape[0]):
        idx = (r2 == e).nonzero(as_tuple=True)[0]
        xe = x2.index_select(0, idx)
        a = F.silu(F.linear(xe, w_gate[e].to(x.dtype))) * F.linear(xe, w_down[e].to(x.dtype))
        y = y.index_add(0, idx, F.linear(a, w_up[e].to(x.dtype)))
    return y.view(x.shape)
