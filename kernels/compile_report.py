"""Compile report: what the launchers' kernels become on Hopper, without a GPU.

``python -m kernels.bench --compile-report`` calls the real launchers on ``meta`` tensors of the headline shapes
(``kernels.launch.capture`` records the launches instead of running them), compiles each recorded launch for
sm_90a with the specialisation the Triton runtime applies at launch (16-byte-aligned pointers and integers
divisible by 16 get ``tt.divisibility = 16``, integers equal to 1 become constants: without this the compiler
builds a different kernel, e.g. without async copies), runs Triton's bundled ``ptxas -v --gpu-name=sm_90a`` on
the PTX and reports per kernel: wgmma vs. mma.sync instructions, registers, spill bytes, shared memory, CTAs per
SM (H100: 64 K registers, 228 KB shared memory, 2048 threads, 32 CTAs per SM), async-copy / TMA use, and the
grid of the headline launch against the 132 SMs of an H100 SXM.

Columns read from the PTX (Hopper readiness, issue 20):
- ``wgmma N``: the narrowest N of the kernel's ``wgmma.mma_async ... m64nNk16`` shapes (8 is the narrowest the
  tensor cores have; a tile whose N is that narrow runs them at a fraction of their rate);
- ``wait``: the deepest ``wgmma.wait_group N`` (0 everywhere = no wgmma overlaps the code after it);
- ``TMA``: ``cp.async.bulk.tensor`` instructions (tensor-descriptor loads / stores).
- ``ex2 ovl``: ``ex2.approx`` instructions (the softmax's exponentials) that execute while a wgmma group is
  committed and not yet waited for, following each loop's back edge once (``ex2_in_flight``): the softmax work
  that overlaps the tensor cores within a warpgroup. Triton's Hopper pipeliner can give this with ``wait 0``
  everywhere (docs/kernels.md), so it is counted directly rather than read from the wait depth.
- ``HBM B/tok`` (launches that declare a token count, the adapter): a traffic model, every tensor argument of
  the launch moved once between HBM and the SM (re-reads within one launch assumed to hit L2), per token. The
  adapter's summary sets each direction's total against its minimum: the forward must read x and write y, the
  backward read x and dy and write dx, each direction read the weights (and the backward write their
  gradients) once.

``--triton DIR`` (kernels.bench) runs the same report in a child process with DIR first on PYTHONPATH (another
installed Triton, e.g. ``pip install --no-deps --target /tmp/triton36 triton==3.6.0``) and prints both side by
side.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import routed_adapter
from .attention import decode as attention_decode
from .attention import plan_launches as attention_plan
from .launch import Launch, capture

H100_SMS = 132
REGS_PER_SM = 64 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
THREADS_PER_SM = 2048
CTAS_PER_SM_MAX = 32


@dataclass
class KernelStats:
    kernel: str
    case: str
    config: str
    wgmma: int
    mma_sync: int
    regs: int
    spill_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    cp_async: int
    tma: int
    programs: int
    waves: float
    wgmma_n: int = 0  # narrowest N of the wgmma shapes (0: no wgmma)
    wait_depth: int = -1  # deepest wgmma.wait_group N (-1: no wait)
    ex2_overlap: int = 0  # ex2.approx executed while a wgmma group is in flight (steady state of each loop)
    hbm_bytes: int = 0  # traffic model: every tensor argument once
    tokens: int = 0  # tokens of the launch, where it declares them (per-token traffic)

    def row(self) -> str:
        wait = "" if self.wait_depth < 0 else self.wait_depth
        per_tok = f"{self.hbm_bytes / self.tokens:.0f}" if self.tokens else ""
        return (
            f"| {self.case} | {self.kernel} | {self.config} | {self.wgmma} | {self.wgmma_n or ''} | {wait} | "
            f"{self.ex2_overlap} | "
            f"{self.mma_sync} | {self.regs} | {self.spill_bytes} | {self.shared_bytes // 1024} | "
            f"{self.ctas_per_sm} | {self.cp_async} | {self.tma} | {self.programs} | {self.waves:.2f} | "
            f"{per_tok} |"
        )


HEADER = (
    "| case | kernel | config | wgmma | wgmma N | wait | ex2 ovl | mma.sync | regs | spill B | smem KB | CTA/SM | "
    "cp.async | TMA | grid | waves | HBM B/tok |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
WGMMA_SHAPE = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
WGMMA_WAIT = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)")
# the PTX events ex2_in_flight follows: commit / wait of wgmma groups, exponentials, labels and branches
_PTX_EVENT = re.compile(
    r"^(?:@!?%p\d+\s+)?(?:(?P<commit>wgmma\.commit_group)|wgmma\.wait_group\.sync\.aligned\s+(?P<wait>\d+)"
    r"|(?P<ex2>ex2\.approx)|bra(?:\.uni)?\s+(?P<bra>\$L__\w+))|^(?P<label>\$L__\w+):"
)


# ----------------------------------------------------------------------------------------------- specialisation
def _specialize(arg, specialize: bool = True, align: bool = True):
    """(type, spec) as the runtime computes them for a launch argument (pointer / int / float / bool)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import native_specialize_impl

        return native_specialize_impl(CUDABackend, arg, False, specialize, align)
    except ImportError:  # older triton: the same rules, written out
        if isinstance(arg, torch.Tensor):
            name = {
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
                torch.float32: "fp32",
                torch.int32: "i32",
                torch.int64: "i64",
            }[arg.dtype]
            return f"*{name}", "D" if align and arg.data_ptr() % 16 == 0 else ""
        if isinstance(arg, bool):
            return "u1", None
        if isinstance(arg, int):
            if not specialize:
                return ("i32" if -(2**31) <= arg < 2**31 else "i64"), ""
            if arg == 1:
                return "constexpr", 1
            return ("i32" if -(2**31) <= arg < 2**31 else "i64"), "D" if arg % 16 == 0 else ""
        return "fp32", None


def _source(rec: Launch):
    """(ASTSource, options) of one recorded launch, specialised like the runtime would specialise it."""
    fn = rec.kernel
    kwargs = dict(rec.kwargs)
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, rec.args, strict=False)) | kwargs
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        val = values[name]
        if param.is_constexpr:
            sig[name], consts[(i,)] = "constexpr", val
            continue
        ty, spec = _specialize(val, not param.do_not_specialize, not param.do_not_specialize_on_alignment)
        if ty == "constexpr":
            sig[name], consts[(i,)] = "constexpr", spec
            continue
        sig[name] = ty
        if isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), opts


def compile_launch(rec: Launch, arch: int = 90):
    """triton.compile of one recorded launch, specialised like the runtime would specialise it."""
    src, opts = _source(rec)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (its PTX version must match)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        try:
            from triton import knobs

            return knobs.nvidia.ptxas.path
        except (ImportError, AttributeError):
            return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_usage(ptx: str, arch: int = 90) -> tuple[int, int]:
    """(registers per thread, spill bytes = stores + loads) from ``ptxas -v --gpu-name=sm_<arch>a``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=False,
        )
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {log[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def ctas_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Occupancy limit on an H100 SM (registers are allocated per warp in units of 256)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, CTAS_PER_SM_MAX)


_BUILT: dict = {}  # launches that compile to the same kernel (same source, constants, options) build once


def _built(rec: Launch, arch: int) -> tuple[str, int, int, int]:
    """(PTX, shared bytes, registers, spill bytes) of the kernel a launch runs, memoised per process."""
    src, opts = _source(rec)
    key = (src.hash(), arch, tuple(sorted(opts.items())))
    if key not in _BUILT:
        kernel = compile_launch(rec, arch)
        ptx = kernel.asm["ptx"]
        _BUILT[key] = (ptx, kernel.metadata.shared, *ptxas_usage(ptx, arch))
    return _BUILT[key]


def wgmma_shape_stats(ptx: str) -> tuple[int, int]:
    """(narrowest wgmma N, deepest wgmma.wait_group N) of a PTX text; (0, -1) without wgmma / waits."""
    widths = [int(n) for _m, n, _k in WGMMA_SHAPE.findall(ptx)]
    waits = [int(w) for w in WGMMA_WAIT.findall(ptx)]
    return min(widths, default=0), max(waits, default=-1)


def _ptx_events(ptx: str) -> list[tuple[str, str]]:
    events = []
    for line in ptx.splitlines():
        m = _PTX_EVENT.match(line.strip())
        if m:
            kind = m.lastgroup
            events.append((kind, m.group(kind)))
    return events


def _pending_after(kind: str, val: str, pending: int) -> int:
    if kind == "commit":
        return pending + 1
    if kind == "wait":
        return min(pending, int(val))
    return pending


def ex2_in_flight(ptx: str) -> int:
    """Static count of ex2.approx instructions that run while at least one wgmma group is committed and not yet
    waited for. A loop (a label some later branch jumps back to) is walked in its steady state: it is entered
    with the groups still pending at its back edge (what the previous iteration left in flight)."""
    events = _ptx_events(ptx)
    labels = {val: i for i, (kind, val) in enumerate(events) if kind == "label"}
    loop_end = {}
    for i, (kind, val) in enumerate(events):
        if kind == "bra" and labels.get(val, i) < i:
            loop_end[labels[val]] = max(i, loop_end.get(labels[val], i))
    pending, count, i = 0, 0, 0
    while i < len(events):
        end = loop_end.get(i, i)
        body = events[i : end + 1]
        if end > i:  # one pass for the state at the back edge, then the counted steady-state pass
            for kind, val in body:
                pending = _pending_after(kind, val, pending)
        for kind, val in body:
            count += kind == "ex2" and pending > 0
            pending = _pending_after(kind, val, pending)
        i = end + 1
    return count


def traffic_bytes(rec: Launch) -> int:
    """HBM traffic model of a launch: each distinct tensor argument moved once (its full size)."""
    seen = {}
    for arg in rec.args:
        if isinstance(arg, torch.Tensor):
            seen[id(arg)] = arg.numel() * arg.element_size()
    return sum(seen.values())


def stats(rec: Launch, case: str, arch: int = 90, tokens: int = 0) -> KernelStats:
    ptx, shared, regs, spills = _built(rec, arch)
    num_warps = rec.kwargs.get("num_warps", 4)
    occ = ctas_per_sm(regs, num_warps, shared)
    programs = math.prod(rec.grid)
    cfg = ",".join(
        f"{k.removeprefix('BLOCK_')}={v}"
        for k, v in rec.kwargs.items()
        if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")
    )
    cfg = cfg.replace("num_warps", "w").replace("num_stages", "s")
    wgmma_n, wait_depth = wgmma_shape_stats(ptx)
    return KernelStats(
        kernel=rec.tag,
        case=case,
        config=cfg,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        regs=regs,
        spill_bytes=spills,
        shared_bytes=shared,
        ctas_per_sm=occ,
        cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        programs=programs,
        waves=programs / (H100_SMS * max(occ, 1)),
        wgmma_n=wgmma_n,
        wait_depth=wait_depth,
        ex2_overlap=ex2_in_flight(ptx),
        hbm_bytes=traffic_bytes(rec),
        tokens=tokens,
    )


# ----------------------------------------------------------------------------------------------- headline launches
ATTN_HEAD_DIMS = (64, 80, 96, 128, 256)
# (causal, gated, q heads, kv heads): PILL's MAG (causal, gated, Llama-3-8B GQA) and plain non-causal MHA
ATTN_CASES = ((True, True, 32, 8), (False, False, 32, 32))
# head dim -> extra cases at that dim: SmolLM2-135M (issue 18), 9 query / 3 KV heads (not a power of two), d64;
# LLaMA-2-7B (the paper's LLM), causal gated MHA 32/32 at d128: the two shapes whose grids must fill 132 SMs
ATTN_EXTRA_CASES = {64: ((True, True, 9, 3),), 128: ((True, True, 32, 32),)}
ATTN_SHAPE = (2, 2048)  # B x T
ADAPTER_TOKENS = (2048, 8192)
ADAPTER_SHAPE = (4096, 32, 2)  # d, r, E


def attention_cases(head_dim: int) -> tuple:
    """(causal, gated, q heads, kv heads) of every attention case the report compiles at this head dim."""
    return ATTN_CASES + ATTN_EXTRA_CASES.get(head_dim, ())


def attention_case_name(head_dim: int, causal: bool, gated: bool, h_q: int, h_kv: int) -> str:
    return (
        f"attn d{head_dim} {'causal' if causal else 'full'} {'gated' if gated else 'nogate'} {h_q}/{h_kv}h "
        f"{ATTN_SHAPE[0]}x{ATTN_SHAPE[1]}"
    )


def attention_launches(
    head_dim: int, causal: bool, gated: bool, h_q: int, h_kv: int, dtype=torch.bfloat16
) -> list[Launch]:
    bsz, t = ATTN_SHAPE
    meta = torch.device("meta")
    q = torch.empty(bsz * t, h_q, head_dim, device=meta, dtype=dtype)
    k = torch.empty(bsz * t, h_kv, head_dim, device=meta, dtype=dtype)
    with capture() as recs:
        g = torch.empty(h_q, bsz * t, device=meta, dtype=torch.float32) if gated else None
        attention_plan(q, k, k, g, bsz, t, causal)
    return recs


DECODE_SHAPE = (8, 4096)  # batch x cached keys, one new token per sequence


def decode_launches(head_dim: int, h_q: int = 32, h_kv: int = 8, dtype=torch.bfloat16) -> list[Launch]:
    """Split-KV decode step: one query per sequence against DECODE_SHAPE keys, gated, GQA."""
    bsz, t_k = DECODE_SHAPE
    meta = torch.device("meta")
    q = torch.empty(bsz, h_q, head_dim, device=meta, dtype=dtype)
    k = torch.empty(bsz * t_k, h_kv, head_dim, device=meta, dtype=dtype)
    g = torch.empty(h_q, bsz * t_k, device=meta, dtype=torch.float32)
    cu_q = torch.arange(0, bsz + 1, device=meta, dtype=torch.int32)
    cu_k = torch.arange(0, (bsz + 1) * t_k, t_k, device=meta, dtype=torch.int32)
    with capture() as recs:
        attention_decode._decode(q, k, k, g, cu_q, cu_k, None, 1, t_k, True, head_dim**-0.5)
    return recs


def adapter_launches(n: int, dtype=torch.bfloat16) -> dict[str, tuple[list[Launch], int]]:
    """direction ("fwd" / "bwd") -> (its launches, the bytes its torch-side weight copies move per call)."""
    d, r, experts = ADAPTER_SHAPE
    meta = torch.device("meta")
    x = torch.empty(n, d, device=meta, dtype=dtype)
    return routed_adapter.plan_launches(
        x, torch.empty(experts, r, d, device=meta), torch.empty(experts, d, r, device=meta)
    )


def adapter_case_name(n: int, direction: str) -> str:
    d, r, experts = ADAPTER_SHAPE
    return f"adapter n{n} d{d} r{r} E{experts} {direction}"


def adapter_min_bytes(n: int, direction: str, elt: int = 2) -> int:
    """What a direction cannot avoid moving: fwd reads x, writes y; bwd reads x, dy, writes dx; each reads the
    weights once in the compute dtype, the backward writes fp32 weight gradients once."""
    d, r, experts = ADAPTER_SHAPE
    weights = 3 * experts * r * d
    if direction == "fwd":
        return 2 * n * d * elt + weights * elt
    return 3 * n * d * elt + weights * (elt + 4)


def report(
    head_dims=ATTN_HEAD_DIMS,
    adapter_tokens=ADAPTER_TOKENS,
    arch: int = 90,
    ops=("attention", "adapter"),
    echo=None,
    only=None,
) -> list[KernelStats]:
    """Compile every headline launch; ``echo(row)`` is called as each kernel finishes (progress). ``only(case,
    tag)``: compile just the launches it accepts (the tests)."""
    out = []

    def add(recs, case, tokens=0):
        for rec in recs:
            if only is not None and not only(case, rec.tag):
                continue
            s = stats(rec, case, arch, tokens)
            out.append(s)
            if echo:
                echo(s.row())

    if "attention" in ops:
        for d in head_dims:
            for causal, gated, h_q, h_kv in attention_cases(d):
                add(attention_launches(d, causal, gated, h_q, h_kv), attention_case_name(d, causal, gated, h_q, h_kv))
            add(decode_launches(d), f"decode d{d} gated 32/8h {DECODE_SHAPE[0]}x1 vs {DECODE_SHAPE[1]} keys")
    if "adapter" in ops:
        for n in adapter_tokens:
            for direction, (recs, _copies) in adapter_launches(n).items():
                add(recs, adapter_case_name(n, direction), tokens=n)
    return out


def adapter_traffic(rows: list[KernelStats], adapter_tokens=ADAPTER_TOKENS) -> str:
    """Markdown: the adapter's modelled HBM bytes per token per direction (kernels + torch-side weight copies)
    against the minimum, and the share of HBM bandwidth that bounds (minimum / model)."""
    lines = [
        "| adapter case | kernels B/tok | torch ops B/tok | model B/tok | minimum B/tok | min / model |",
        "|---|---|---|---|---|---|",
    ]
    for n in adapter_tokens:
        for direction, (_recs, copies) in adapter_launches(n).items():
            case = adapter_case_name(n, direction)
            kern = sum(r.hbm_bytes for r in rows if r.case == case)
            if not kern:
                continue
            model, low = kern + copies, adapter_min_bytes(n, direction)
            lines.append(
                f"| {case} | {kern / n:.0f} | {copies / n:.0f} | {model / n:.0f} | {low / n:.0f} | {low / model:.0%} |"
            )
    return "\n".join(lines)


def as_json(rows: list[KernelStats]) -> list[dict]:
    return [asdict(r) for r in rows]


def from_json(items: list[dict]) -> list[KernelStats]:
    return [KernelStats(**item) for item in items]


def side_by_side(a: list[KernelStats], b: list[KernelStats], name_a: str, name_b: str) -> str:
    """Markdown: the two reports' rows matched by (case, kernel, occurrence): regs, spill, wgmma N, wait, TMA."""

    def keyed(rows):
        seen, out = {}, {}
        for r in rows:
            k = (r.case, r.kernel)
            seen[k] = seen.get(k, -1) + 1
            out[(*k, seen[k])] = r
        return out

    ka, kb = keyed(a), keyed(b)
    cols = ("config", "regs", "spill B", "wgmma N", "wait", "ex2 ovl", "TMA")
    head = "| case | kernel | " + " | ".join(f"{c} {name_a} / {name_b}" for c in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for key in [*ka, *(k for k in kb if k not in ka)]:
        ra_, rb_ = ka.get(key), kb.get(key)

        def pair(attr, ra_=ra_, rb_=rb_):
            return " / ".join("-" if r is None else str(getattr(r, attr)) for r in (ra_, rb_))

        lines.append(
            f"| {key[0]} | {key[1]} | {pair('config')} | {pair('regs')} | {pair('spill_bytes')} | "
            f"{pair('wgmma_n')} | {pair('wait_depth')} | {pair('ex2_overlap')} | {pair('tma')} |"
        )
    return "\n".join(lines)
