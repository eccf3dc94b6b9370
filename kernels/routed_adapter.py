"""Fused modality-routed SwiGLU adapter (PILL's MoMAE experts and the shared attention adapter).

Paper: PILL (arXiv 2311.02126), "Mixture-of-Modality-Adapter-Expert" with SwiGLU adapters:

    y[t] = x[t] + U_e (SiLU(D1_e x[t]) * (D2_e x[t]))        e = route[t];  D1 = w_gate, D2 = w_down, U = w_up

Design choices
- Memory-bound op (r = 32 << d = 4096): judged in GB/s. Tokens are grouped by expert once (a stable argsort of
  ``route`` plus per-expert offsets, computed on the device without a host sync); each program owns BLOCK_M
  tokens of ONE expert, so every token computes only its own expert. A program reads its x rows for the down
  projections, keeps the (BLOCK_M, r) activations in registers and reads the rows again for the up projection
  and the residual (the second read is an L2 hit for these tile sizes), and writes y once.
- Compute dtype: matmul operands are in the activation dtype (fp32 adapter weights are cast to bf16/fp16 on load,
  which is what ``torch.autocast`` does to F.linear), accumulation, SiLU, the product and the residual add are
  fp32, y is written in x's dtype. fp32 activations use IEEE fp32 dots. Under the Triton interpreter everything
  runs in fp32 (its bf16 ``tl.dot`` is wrong). Weight gradients are fp32 (the weights are fp32 master weights).
- Backward: kernel 1 per token block recomputes nothing heavy: the forward saved the pre-activations
  hg = D1 x and hd = D2 x (fp32, (N, r): 2r/d of x's size); it computes dA = dy U_e, dhg, dhd and dx.
  Kernel 2 computes the weight gradients per (d-tile, expert, token split); tokens of expert e only ever add
  to expert e. With more than one split per expert the partial sums meet through fp32 atomics
  (non-deterministic summation order on GPU; one split, deterministic, in the interpreter).
- Works unrouted: E = 1 with ``route`` all zeros is the shared attention adapter.

Caveats
- ``route`` values must lie in [0, E); out-of-range values are not checked on the device (indexing error).
- Triton runs when tensors are on CUDA, or when TRITON_INTERPRET=1 was set before import; otherwise the
  reference. Tile sizes for the GPU are not tuned on this machine (no GPU).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import launch, on_gpu

H100_SMS = 132  # SM count the launchers plan for when they only plan (meta tensors, compile report)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _block_tokens(PERM, OFFS, BCUM, pid, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert of token block pid and the token ids (rows of x) it owns; e == NUM_EXPERTS means no work."""
    e = pid * 0  # a tensor from the start: compiled Triton rejects loop-carried values that change type
    for i in range(NUM_EXPERTS):  # block ids are laid out expert after expert: count the experts before pid
        e += (pid >= tl.load(BCUM + i)).to(tl.int32)
    e_safe = tl.minimum(e, NUM_EXPERTS - 1)
    t0 = tl.load(OFFS + e_safe)
    t1 = tl.load(OFFS + e_safe + 1)
    first_block = tl.load(BCUM + e_safe) - tl.cdiv(t1 - t0, BLOCK_M)
    idx = t0 + (pid - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = idx < tl.where(e < NUM_EXPERTS, t1, t0)
    rows = tl.load(PERM + idx, mask=valid, other=0).to(tl.int64)
    return e, e_safe.to(tl.int64), rows, valid


@triton.jit
def _routed_adapter_fwd_kernel(X, Y, WG, WD, WU, HG, HD, PERM, OFFS, BCUM, stride_x, stride_y, D, R,
                               NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_R: tl.constexpr, SAVE_H: tl.constexpr, COMPUTE_F32: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    e, e_i, rows, valid = _block_tokens(PERM, OFFS, BCUM, pid, NUM_EXPERTS, BLOCK_M)
    if e >= NUM_EXPERTS:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    wg_base = WG + e_i * R * D  # (R, D) of expert e
    wd_base = WD + e_i * R * D
    wu_base = WU + e_i * D * R  # (D, R) of expert e
    hg = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    hd = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        c_ok = cols < D
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
        w_off = offs_r[:, None] * D + cols[None, :]
        w_mask = r_ok[:, None] & c_ok[None, :]
        wg = tl.load(wg_base + w_off, mask=w_mask, other=0.0)
        wd = tl.load(wd_base + w_off, mask=w_mask, other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
        hg = tl.dot(x, tl.trans(wg.to(x.dtype)), hg, input_precision=DOT_PREC)
        hd = tl.dot(x, tl.trans(wd.to(x.dtype)), hd, input_precision=DOT_PREC)
    if SAVE_H:  # pre-activations for the backward: (N, R) fp32, tiny next to x
        h_off = rows[:, None] * R + offs_r[None, :]
        h_mask = valid[:, None] & r_ok[None, :]
        tl.store(HG + h_off, hg, mask=h_mask)
        tl.store(HD + h_off, hd, mask=h_mask)
    a = hg * tl.sigmoid(hg) * hd  # SiLU(D1 x) * D2 x, fp32
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        c_ok = cols < D
        xy_mask = valid[:, None] & c_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=xy_mask, other=0.0)
        wu = tl.load(wu_base + cols[:, None] * R + offs_r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
        up = tl.dot(a.to(x.dtype), tl.trans(wu.to(x.dtype)), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
        y = x.to(tl.float32) + up
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=xy_mask)


@triton.jit
def _routed_adapter_bwd_dx_kernel(DY, DX, WG, WD, WU, HG, HD, DHG, DHD, PERM, OFFS, BCUM, stride_dy, stride_dx, D, R,
                                  NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_R: tl.constexpr, COMPUTE_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    e, e_i, rows, valid = _block_tokens(PERM, OFFS, BCUM, pid, NUM_EXPERTS, BLOCK_M)
    if e >= NUM_EXPERTS:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    wg_base = WG + e_i * R * D
    wd_base = WD + e_i * R * D
    wu_base = WU + e_i * D * R
    da = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):  # dA = dy U_e
        cols = d0 + offs_d
        c_ok = cols < D
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
        wu = tl.load(wu_base + cols[:, None] * R + offs_r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
        da = tl.dot(dy, wu.to(dy.dtype), da, input_precision=DOT_PREC)
    h_off = rows[:, None] * R + offs_r[None, :]
    h_mask = valid[:, None] & r_ok[None, :]
    hg = tl.load(HG + h_off, mask=h_mask, other=0.0)
    hd = tl.load(HD + h_off, mask=h_mask, other=0.0)
    sig = tl.sigmoid(hg)
    dhd = da * hg * sig
    dhg = da * hd * sig * (1.0 + hg * (1.0 - sig))  # d SiLU(h) / dh = s (1 + h (1 - s))
    tl.store(DHG + h_off, dhg, mask=h_mask)
    tl.store(DHD + h_off, dhd, mask=h_mask)
    for d0 in range(0, D, BLOCK_D):  # dx = dy + dhg D1_e + dhd D2_e
        cols = d0 + offs_d
        c_ok = cols < D
        xy_mask = valid[:, None] & c_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=xy_mask, other=0.0)
        if COMPUTE_F32:
            dy = dy.to(tl.float32)
        w_off = offs_r[:, None] * D + cols[None, :]
        w_mask = r_ok[:, None] & c_ok[None, :]
        wg = tl.load(wg_base + w_off, mask=w_mask, other=0.0).to(dy.dtype)
        wd = tl.load(wd_base + w_off, mask=w_mask, other=0.0).to(dy.dtype)
        dx = dy.to(tl.float32)
        dx = tl.dot(dhg.to(dy.dtype), wg, dx, input_precision=DOT_PREC)
        dx = tl.dot(dhd.to(dy.dtype), wd, dx, input_precision=DOT_PREC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=xy_mask)


@triton.jit
def _routed_adapter_bwd_dw_kernel(X, DY, HG, HD, DHG, DHD, DWG, DWD, DWU, PERM, OFFS, stride_x, stride_dy, D, R,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                                  SPLIT: tl.constexpr, COMPUTE_F32: tl.constexpr, DOT_PREC: tl.constexpr):
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
    dwg = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    dwd = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(lo, hi, BLOCK_M):  # only tokens routed to expert e
        idx = s + tl.arange(0, BLOCK_M)
        valid = idx < hi
        rows = tl.load(PERM + idx, mask=valid, other=0).to(tl.int64)
        xy_mask = valid[:, None] & c_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=xy_mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=xy_mask, other=0.0)
        if COMPUTE_F32:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        h_off = rows[:, None] * R + offs_r[None, :]
        h_mask = valid[:, None] & r_ok[None, :]
        hg = tl.load(HG + h_off, mask=h_mask, other=0.0)
        hd = tl.load(HD + h_off, mask=h_mask, other=0.0)
        dhg = tl.load(DHG + h_off, mask=h_mask, other=0.0)
        dhd = tl.load(DHD + h_off, mask=h_mask, other=0.0)
        a = hg * tl.sigmoid(hg) * hd
        dwu = tl.dot(tl.trans(dy), a.to(dy.dtype), dwu, input_precision=DOT_PREC)  # (BLOCK_D, BLOCK_R)
        dwg = tl.dot(tl.trans(dhg.to(x.dtype)), x, dwg, input_precision=DOT_PREC)  # (BLOCK_R, BLOCK_D)
        dwd = tl.dot(tl.trans(dhd.to(x.dtype)), x, dwd, input_precision=DOT_PREC)
    w_off = e * R * D + offs_r[:, None] * D + cols[None, :]
    w_mask = r_ok[:, None] & c_ok[None, :]
    u_off = e * D * R + cols[:, None] * R + offs_r[None, :]
    u_mask = c_ok[:, None] & r_ok[None, :]
    if SPLIT == 1:
        tl.store(DWG + w_off, dwg, mask=w_mask)
        tl.store(DWD + w_off, dwd, mask=w_mask)
        tl.store(DWU + u_off, dwu, mask=u_mask)
    else:
        tl.atomic_add(DWG + w_off, dwg, mask=w_mask)
        tl.atomic_add(DWD + w_off, dwd, mask=w_mask)
        tl.atomic_add(DWU + u_off, dwu, mask=u_mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def _config(d: int, r: int, device: torch.device) -> dict:
    block_r = max(16, triton.next_power_of_2(r))
    block_d = max(16, triton.next_power_of_2(d))
    if not on_gpu(device):  # interpreter: few, small programs
        return {"BLOCK_M": 16, "BLOCK_D": min(64, block_d), "BLOCK_R": block_r, "num_warps": 1}
    return {"BLOCK_M": 64, "BLOCK_D": min(128, block_d), "BLOCK_R": block_r, "num_warps": 4}


def _flags(x: torch.Tensor) -> dict:
    f32 = not on_gpu(x.device) or x.dtype == torch.float32
    return {"COMPUTE_F32": f32, "DOT_PREC": "ieee" if f32 else "tf32"}


def _schedule(route: torch.Tensor, num_experts: int, block_m: int):
    """Token order grouped by expert, per-expert offsets (E+1,) and inclusive block counts (E,); no host sync."""
    route = route.to(torch.int64)
    perm = torch.argsort(route, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=route.device)
    counts.scatter_add_(0, route, torch.ones_like(route, dtype=torch.int32))
    offs = torch.zeros(num_experts + 1, dtype=torch.int32, device=route.device)
    offs[1:] = torch.cumsum(counts, 0)
    bcum = torch.cumsum((counts + block_m - 1) // block_m, 0)
    return perm, offs, bcum.to(torch.int32)


def _dw_split(n: int, num_experts: int, n_dtiles: int, block_m: int, device: torch.device) -> int:
    """Token splits per (d-tile, expert) of the weight-gradient kernel: ~4 programs per SM on a GPU, else 1."""
    if not on_gpu(device):
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS
    return max(1, min(triton.cdiv(n, block_m * num_experts), 4 * sms // (n_dtiles * num_experts)))


def _forward(x2, route, wg, wd, wu):
    """x2 (N, d) -> y (N, d), the saved pre-activations hg, hd (N, r) fp32 and the expert schedule."""
    num_experts, r, d = wg.shape
    n = x2.shape[0]
    cfg = _config(d, r, x2.device)
    perm, offs, bcum = _schedule(route.reshape(-1).to(x2.device), num_experts, cfg["BLOCK_M"])
    y = torch.empty_like(x2)
    hg = torch.empty((n, r), device=x2.device, dtype=torch.float32)
    hd = torch.empty_like(hg)
    if n > 0:
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) + num_experts,)  # upper bound on per-expert blocks
        launch(_routed_adapter_fwd_kernel, grid, x2, y, wg, wd, wu, hg, hd, perm, offs, bcum, x2.stride(0),
               y.stride(0), d, r, NUM_EXPERTS=num_experts, SAVE_H=True, **_flags(x2), **cfg)
    return y, hg, hd, (perm, offs, bcum)


def _backward(dy2, x2, wg, wd, wu, hg, hd, schedule):
    perm, offs, bcum = schedule
    num_experts, r, d = wg.shape
    n = x2.shape[0]
    cfg = _config(d, r, x2.device)
    flags = _flags(x2)
    dx = torch.empty_like(x2)
    dhg, dhd = torch.empty_like(hg), torch.empty_like(hd)
    dwg = torch.zeros(wg.shape, device=x2.device, dtype=torch.float32)
    dwd = torch.zeros_like(dwg)
    dwu = torch.zeros(wu.shape, device=x2.device, dtype=torch.float32)
    if n > 0:
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) + num_experts,)
        launch(_routed_adapter_bwd_dx_kernel, grid, dy2, dx, wg, wd, wu, hg, hd, dhg, dhd, perm, offs, bcum,
               dy2.stride(0), dx.stride(0), d, r, NUM_EXPERTS=num_experts, **flags, **cfg)
        n_dtiles = triton.cdiv(d, cfg["BLOCK_D"])
        split = _dw_split(n, num_experts, n_dtiles, cfg["BLOCK_M"], x2.device)
        launch(_routed_adapter_bwd_dw_kernel, (n_dtiles, num_experts, split),
               x2, dy2, hg, hd, dhg, dhd, dwg, dwd, dwu, perm, offs, x2.stride(0), dy2.stride(0), d, r,
               SPLIT=split, **flags, **cfg)
    return dx, dwg, dwd, dwu


def plan_launches(x2: torch.Tensor, w_rd: torch.Tensor, w_dr: torch.Tensor) -> None:
    """Forward and backward launches for x2 (N, d) with E = w_rd.shape[0] experts, tokens split evenly (for the
    compile report, on meta tensors inside ``launch.capture``)."""
    n = x2.shape[0]
    route = torch.arange(n, device=x2.device) * w_rd.shape[0] // max(n, 1)
    y, hg, hd, schedule = _forward(x2, route, w_rd, w_rd, w_dr)
    _backward(y, x2, w_rd, w_rd, w_dr, hg, hd, schedule)


class RoutedSwiGLUAdapterFunction(torch.autograd.Function):
    """Triton forward/backward of ``routed_swiglu_adapter``."""

    @staticmethod
    def forward(ctx, x, route, w_gate, w_down, w_up):
        _check(x, route, w_gate, w_down, w_up)
        d = w_gate.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        wg, wd, wu = w_gate.contiguous(), w_down.contiguous(), w_up.contiguous()
        y, hg, hd, schedule = _forward(x2, route, wg, wd, wu)
        ctx.save_for_backward(x2, wg, wd, wu, hg, hd, *schedule)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, wg, wd, wu, hg, hd, *schedule = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[1]).contiguous()
        dx, dwg, dwd, dwu = _backward(dy2, x2, wg, wd, wu, hg, hd, schedule)
        return (dx.view(ctx.x_shape), None, dwg.to(wg.dtype), dwd.to(wd.dtype), dwu.to(wu.dtype))


def _check(x, route, w_gate, w_down, w_up) -> None:
    if w_gate.dim() != 3 or w_gate.shape != w_down.shape:
        raise ValueError(f"routed_swiglu_adapter: w_gate/w_down must be (E, r, d) alike, got {tuple(w_gate.shape)}, "
                         f"{tuple(w_down.shape)}")
    num_experts, r, d = w_gate.shape
    if w_up.shape != (num_experts, d, r):
        raise ValueError(f"routed_swiglu_adapter: w_up must be {(num_experts, d, r)}, got {tuple(w_up.shape)}")
    if x.shape[-1] != d or route.shape != x.shape[:-1]:
        raise ValueError(f"routed_swiglu_adapter: x (..., {d}) and route (...) must match, got x {tuple(x.shape)}, "
                         f"route {tuple(route.shape)}")
    if route.dtype.is_floating_point or route.dtype.is_complex:
        raise ValueError(f"routed_swiglu_adapter: route must be an integer (or bool) tensor, got {route.dtype}")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")


def routed_swiglu_adapter(x: torch.Tensor, route: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor,
                          w_up: torch.Tensor) -> torch.Tensor:
    """x + w_up[e] @ (silu(w_gate[e] @ x) * (w_down[e] @ x)) with e = route per token (see module docstring)."""
    if _use_triton(x):
        return RoutedSwiGLUAdapterFunction.apply(x, route, w_gate, w_down, w_up)
    return routed_swiglu_adapter_ref(x, route, w_gate, w_down, w_up)


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------
def routed_swiglu_adapter_ref(x: torch.Tensor, route: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor,
                              w_up: torch.Tensor) -> torch.Tensor:
    """PILL's formulation: every expert on every token, then select per token. Computes in x's dtype (weights cast
    like autocast does); call it on fp32 x for the gold reference."""
    _check(x, route, w_gate, w_down, w_up)
    wg, wd, wu = (w.to(x.dtype) for w in (w_gate, w_down, w_up))
    hg = torch.einsum("...d,erd->...er", x, wg)
    hd = torch.einsum("...d,erd->...er", x, wd)
    out = torch.einsum("...er,edr->...ed", F.silu(hg) * hd, wu)  # (..., E, d): every expert's output
    sel = route.to(device=x.device, dtype=torch.int64)[..., None, None].expand(*route.shape, 1, x.shape[-1])
    return x + torch.gather(out, -2, sel).squeeze(-2)


def routed_swiglu_adapter_eager(x: torch.Tensor, route: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor,
                                w_up: torch.Tensor) -> torch.Tensor:
    """Routed eager baseline: gather each expert's tokens, run only that expert, scatter back (host syncs)."""
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
