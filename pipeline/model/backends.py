"""`auto` backends: the Triton kernels on CUDA when they import and agree with the reference, else PyTorch.

The check runs once per process and device kind, at the first forward, on a small problem in the training
dtype; its result and the reason are logged, so a run's log says which path computed it.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def resolve_attn_backend(name: str, device: torch.device) -> str:
    """`auto` -> triton on CUDA when the kernel passes its self-check, else sdpa; any other name unchanged."""
    if name != "auto":
        return name
    ok, why = _triton_self_check(device.type, "attention")
    log.info("attn_backend auto -> %s (%s)", "triton" if ok else "sdpa", why)
    return "triton" if ok else "sdpa"


def resolve_backends(cfg, device: torch.device, zero3: bool = False) -> tuple[str, str]:
    """(attention backend, adapter backend) with `auto` replaced by what this device runs.

    `zero3`: the trainable weights are ZeRO-3 partitions. The fused adapter reads the expert weights as tensors
    (not through module calls, whose hooks gather them), so it needs whole weights: auto picks eager there."""
    attn, adapter = cfg.attn_backend, cfg.adapter_backend
    if zero3 and adapter == "triton":
        raise ValueError(
            "adapter_backend='triton' reads whole expert weights, which ZeRO-3 partitions: use "
            "adapter_backend='auto' or 'eager' under ZeRO-3 (or ZeRO-2, where the trainables are whole)"
        )
    attn = resolve_attn_backend(attn, device)
    if adapter == "auto":
        ok, why = (
            _triton_self_check(device.type, "adapter")
            if cfg.adapter_act == "swiglu" and not zero3
            else (
                False,
                "ZeRO-3 partitions the expert weights"
                if zero3
                else f"adapter_act={cfg.adapter_act} has no fused kernel",
            )
        )
        adapter = "triton" if ok else "eager"
        log.info("adapter_backend auto -> %s (%s)", adapter, why)
    return attn, adapter


@functools.cache
def _triton_self_check(device_type: str, op: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, f"device {device_type}: the Triton kernels run on CUDA"
    try:
        import pill_kernels as K
    except Exception as e:  # an import failure must fall back, whatever its type
        return False, f"pill_kernels does not import: {e!r}"
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        if op == "attention":
            q, k, v = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            gate = torch.rand(1, 128, 4, device="cuda", dtype=torch.bfloat16, generator=g)
            got, ref = K.gated_attention(q, k, v, gate), K.gated_attention_ref(q, k, v, gate)
        else:
            x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16, generator=g)
            route = torch.randint(0, 2, (256,), device="cuda", generator=g)
            w = [torch.randn(2, 32, 256, device="cuda", generator=g) * 0.05 for _ in range(2)]
            up = torch.randn(2, 256, 32, device="cuda", generator=g) * 0.05
            got, ref = (
                K.routed_swiglu_adapter(x, route, *w, up),
                K.routed_swiglu_adapter_ref(x.float(), route, *w, up),
            )
        err = (got.float() - ref.float()).abs().max().item()
    except Exception as e:
        return False, f"the {op} kernel failed its self-check: {e!r}"
    if not err < 5e-2:
        return False, f"the {op} kernel differs from the reference by {err:.3g}"
    return True, f"Triton {op} kernel passed the self-check (max err {err:.2g})"
