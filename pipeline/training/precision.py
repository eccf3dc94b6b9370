"""`precision: auto`: bf16 where the hardware runs it natively and not slower than fp32, else fp32 (issue 27, item 6).

CUDA: bf16 when `torch.cuda.is_bf16_supported()` (Ampere and later); otherwise fp32, since this trainer has no fp16
loss scaling. CPU: bf16 only when torch's oneDNN reports native bf16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`:
avx512_bf16 / AMX and a build that uses them) AND a short measured probe (a Linear-shaped matmul at the model's
width, fp32 vs bf16, well under a second) shows bf16 is not slower. The flags of /proc/cpuinfo alone are not enough:
on a CPU without a native kernel torch still runs bf16, only 2-70x slower by shape (measured on an AVX2-only Zen 3
CPU: README "Precision", scripts/precision_probe.py), so a wrong pick would cost a run hours.

The decision is made once per rank before launch; `agree_across_ranks` then makes every rank take fp32 if any rank
measured otherwise (a measured ratio near 1 could differ between ranks), so all ranks train the same precision. The
resolved value replaces "auto" in the config, so the run dir's config.json records it and a resume that would resolve
differently is a named config change (pipeline.training.run_record), never a silent flip.
"""

from __future__ import annotations

import time

import torch

from pipeline.training.dist import all_agree_any

AUTO_PROBE_BUDGET_S = 0.5
"""Stop measuring once a probe has spent this long: by then bf16 is clearly slower."""


def cuda_bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mkldnn_bf16_supported() -> bool:
    """What decides whether CPU bf16 GEMMs get a native oneDNN kernel (False: emulated, far slower)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def _best_time(fn, reps: int, budget_s: float) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def measure_cpu_bf16_speed(width: int, rows: int = 256, reps: int = 5) -> float:
    """bf16 speed / fp32 speed of a Linear(width -> 3 x width) forward on `rows` tokens (best of `reps`): > 1 means
    bf16 is faster. The shape must be a training one: on an AVX2-only CPU a 32 x 256 x 768 product measured bf16 at
    0.8-1.9x the fp32 speed, 256 x 576 x 1728 at 0.15-0.3x. The width is capped at 1024 so that a 7B model's probe
    stays as short as a small one's (about a second even where bf16 is emulated)."""
    k = max(16, min(int(width), 1024))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(3 * k, k, generator=gen)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.no_grad():
        t32 = _best_time(lambda: torch.nn.functional.linear(x, w), reps, AUTO_PROBE_BUDGET_S)
        t16 = _best_time(lambda: torch.nn.functional.linear(xb, wb), reps, AUTO_PROBE_BUDGET_S)
    return t32 / t16


def resolve_precision(device: torch.device | str, width: int = 1024) -> tuple[str, str]:
    """("bf16" | "fp32", why) for `precision: auto` on `device`; `width` is the LLM's hidden size (the probe's)."""
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_bf16_supported():
            return "bf16", "cuda: bf16 supported"
        return "fp32", "cuda: no bf16 on this GPU (pre-Ampere) and fp16 needs loss scaling, which is not supported"
    if device.type != "cpu":
        return "fp32", f"{device.type}: bf16 not known to run natively there"
    if not mkldnn_bf16_supported():
        return "fp32", "cpu: no native bf16: mkldnn bf16 unsupported"
    ratio = measure_cpu_bf16_speed(width)
    if ratio >= 1.0:
        return "bf16", f"cpu: native bf16 (mkldnn), measured {ratio:.2f}x the fp32 speed at width {width}"
    return "fp32", f"cpu: mkldnn reports bf16 but it measured {ratio:.2f}x the fp32 speed at width {width} (slower)"


def agree_across_ranks(precision: str, device: torch.device) -> str:
    """Collective: fp32 on every rank if any rank resolved fp32 (never a mixed-precision world)."""
    return "fp32" if all_agree_any(precision != "bf16", device) else precision
