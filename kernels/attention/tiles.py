"""Tile sizes per (BLOCK_D, dtype, arch) and the forward's load-path switches (TMA, overlap).

Block sizes for the GPU come from the table below, checked with the compile report (``python -m kernels.bench
--compile-report``: wgmma for every dot, no spills, shared memory within budget), not autotuned or timed. The
switches ``USE_TMA`` and ``FWD_OVERLAP`` are read here at each launch, so the bench and the tests flip them on this
module.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ..launch import ensure_scratch_allocator, on_gpu


def _cfg(m, n, warps, stages):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


# Tiles per (BLOCK_D, dtype) on Hopper (sm_90), chosen from the compile report (wgmma for every dot, no spills,
# shared memory within 227 KB; docs/kernels.md); not tuned on a GPU yet. fwd: BLOCK_M queries x BLOCK_N keys;
# dkdv: BLOCK_M queries streamed past BLOCK_N keys (the keys are the wgmma rows); dq: BLOCK_M queries x BLOCK_N
# keys. Gated and ungated attention share every tile (the gate's gradient lives in the dQ kernel). Sequence
# length is not part of the key: a new length never compiles a new kernel. fwd_tma: the forward when K/V arrive
# through TMA descriptors (no address registers, no masks): at d128 a 128-key tile fits without spilling (wgmma
# N 128 for both matmuls), where the pointer-load kernel at that tile spills. fwd_overlap: the forward whose
# softmax overlaps the previous block's P V (_fwd_inner_overlap; two score tiles live, so 64 keys per step and 8
# warps: no spill at d64/d128), preferred over fwd_tma where both exist unless FWD_OVERLAP is off. dq_tma
# likewise: 64 keys per step at d64/d128 (wgmma N 64, was 32), and at d256 a tile that spills under neither
# Triton (3.6 spilled 308 B).
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


def _fwd_tile(cfgs: dict, tma: bool) -> tuple[dict, bool]:
    """The forward's tile and whether it runs the overlapped loop: ``fwd_overlap`` with TMA unless FWD_OVERLAP is
    off, else ``fwd_tma``'s wider in-order tile with TMA, else the pointer-load tile."""
    overlap = tma and FWD_OVERLAP and "fwd_overlap" in cfgs
    cfg = cfgs["fwd_overlap"] if overlap else cfgs["fwd_tma"] if tma and "fwd_tma" in cfgs else cfgs["fwd"]
    return cfg, overlap


def _dq_tile(cfgs: dict, tma: bool) -> dict:
    """The dQ tile: 64 keys per step where K/V arrive through TMA (``dq_tma``), else the pointer-load tile."""
    return cfgs["dq_tma"] if tma and "dq_tma" in cfgs else cfgs["dq"]


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
