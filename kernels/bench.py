"""Benchmarks of the PILL kernels against their baselines: ``python -m kernels.bench [--quick] [--out DIR]``.

Attention (LLaMA-2-7B: 32 heads x 128, causal, gate from a visual fraction): Triton gated attention (K/V through
TMA descriptors with the overlapped forward; the in-order TMA forward as ``triton_in_order`` and the pointer-load
fallback as ``triton_pointers``) vs SDPA on gated V (v * g computed inside the timed call, as the model would) per
available backend (flash, cuDNN, efficient), the eager reference, and flash-attn's ``flash_attn_func`` when
installed. TFLOP/s counts the causal half only: fwd = 2 matmuls x 2 B H Tq
Tk D / 2, bwd = 2.5 x fwd.
Adapter (d 4096, r 32, 2 experts, fp32 weights, bf16 activations): Triton routed adapter vs PILL's reference
formulation (every expert, then select), the routed eager version, and torch.compile(reference). GB/s counts the
activation traffic the op cannot avoid: fwd reads x and writes y, bwd reads x and dy and writes dx (+ weights).

Modes fwd, bwd (backward only, graph retained) and fwd+bwd; median times from triton.testing.do_bench; peak memory
is the allocator's peak above the inputs during one call. Results go to DIR/kernels_bench.{json,md} with the
device, versions and the command. Without CUDA this says so, runs a Triton-interpreter smoke check of both ops on
tiny shapes against the references (in a child process, since TRITON_INTERPRET must be set before triton is
imported), writes the smoke result and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from . import compile_report as cr
from .attention import gated_attention, gated_attention_ref, tiles
from .routed_adapter import routed_swiglu_adapter, routed_swiglu_adapter_eager, routed_swiglu_adapter_ref

SMOKE_OK = "SMOKE OK"
NO_CUDA = "No CUDA device: GPU benchmark skipped; running the Triton-interpreter smoke check instead"

ATTN_SHAPES = [(4, 512), (4, 1024), (2, 2048), (1, 4096), (1, 8192)]
ATTN_SHAPES_QUICK = [(2, 2048)]  # the headline shape (issue 13: >= 400 TFLOP/s forward, causal d128)
ADAPTER_SHAPES = [(4, 512), (2, 2048), (1, 8192)]
ADAPTER_SHAPES_QUICK = [(2, 2048), (1, 8192)]
VISUAL_FRACTIONS = [0.1, 0.3, 0.5]
MODES = ["fwd", "bwd", "fwd+bwd"]


# ---------------------------------------------------------------------------------------------------------- inputs
def _route(bsz: int, seq: int, frac: float, device) -> torch.Tensor:
    """PILL-like modality mask: runs of K = 32 visual tokens (one image each) spread over the sequence (shorter runs
    for the tiny smoke shapes)."""
    route = torch.zeros(bsz, seq, dtype=torch.long)
    run = min(32, max(1, seq // 4))
    n_img = max(1, round(frac * seq / run))
    for s in torch.linspace(0, seq - run, n_img).long().tolist():
        route[:, s : s + run] = 1
    return route.to(device)


def _attn_inputs(bsz, seq, heads, kv_heads, dim, frac, dtype, device):
    q = torch.randn(bsz, seq, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(bsz, seq, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(bsz, seq, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    visual = _route(bsz, seq, frac, device).bool()
    g = torch.where(visual[..., None], torch.tanh(torch.randn(bsz, seq, heads, device=device)), 1.0)
    return q, k, v, g.to(dtype).requires_grad_()


def _adapter_inputs(bsz, seq, d, r, experts, frac, dtype, device):
    x = torch.randn(bsz, seq, d, device=device, dtype=dtype, requires_grad=True)
    route = _route(bsz, seq, frac, device).clamp(max=experts - 1)
    ws = [
        torch.randn(experts, r, d, device=device) / d**0.5,
        torch.randn(experts, r, d, device=device) / d**0.5,
        torch.randn(experts, d, r, device=device) / r**0.5,
    ]
    return x, route, [w.requires_grad_() for w in ws]


# ---------------------------------------------------------------------------------------------------------- baselines
def _attention_providers(causal: bool, gqa: bool = False) -> dict:
    def sdpa(backend):
        def fn(q, k, v, g):
            # pre-gated V; under GQA the per-query-head gate needs V expanded to the query heads (what the
            # model's SDPA path does), and K with it
            if gqa:
                rep = q.shape[2] // k.shape[2]
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            vg = v * g[..., None]
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), vg.transpose(1, 2), is_causal=causal
                )
            return o.transpose(1, 2)

        return fn

    providers = {
        "triton": lambda q, k, v, g: gated_attention(q, k, v, g, causal=causal),
        # the same op with the in-order TMA forward (d128: 128-key tiles) and with K/V pointer loads instead of
        # TMA descriptors (timed under _PROVIDER_CONTEXT's switches)
        "triton_in_order": lambda q, k, v, g: gated_attention(q, k, v, g, causal=causal),
        "triton_pointers": lambda q, k, v, g: gated_attention(q, k, v, g, causal=causal),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "eager_ref": lambda q, k, v, g: gated_attention_ref(q, k, v, g, causal=causal),
    }

    def pregated(fn):  # flash-attn's own GQA cannot gate per query head: expand like SDPA above
        def call(q, k, v, g):
            if gqa:
                rep = q.shape[2] // k.shape[2]
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            return fn(q, k, v * g[..., None], causal=causal)

        return call

    try:
        from flash_attn import flash_attn_func

        providers["flash_attn"] = pregated(flash_attn_func)
    except ImportError:
        pass
    try:  # FlashAttention-3 (Hopper), from the flash-attn repository's hopper/ build
        from flash_attn_interface import flash_attn_func as fa3_func

        providers["fa3"] = pregated(lambda q, k, v, causal: _first(fa3_func(q, k, v, causal=causal)))
    except ImportError:
        pass
    return providers


def _first(out):
    """FA3 returns (out, lse) in some versions."""
    return out[0] if isinstance(out, tuple) else out


def _adapter_providers() -> dict:
    return {
        "triton": routed_swiglu_adapter,
        "reference": routed_swiglu_adapter_ref,
        "routed_eager": routed_swiglu_adapter_eager,
        "compiled_reference": torch.compile(routed_swiglu_adapter_ref, dynamic=False),
    }


# ---------------------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _switched(name: str, value: bool):
    """One of gated_attention's path switches (attention/tiles.py: USE_TMA, FWD_OVERLAP) for a whole measurement
    (forward and backward launches alike), so the first GPU hour sees which path wins."""
    old = getattr(tiles, name)
    setattr(tiles, name, value)
    try:
        yield
    finally:
        setattr(tiles, name, old)


_PROVIDER_CONTEXT = {
    "triton_in_order": lambda: _switched("FWD_OVERLAP", False),
    "triton_pointers": lambda: _switched("USE_TMA", False),
}


def _measure(fn, args, leaves, mode, cuda_graph=False):
    """Median ms and peak extra MiB of one provider in one mode; (None, None, reason) when it cannot run.
    cuda_graph: time a CUDA-graph replay (no launch overhead: what decides small shapes)."""
    try:
        if mode == "fwd":

            def call():
                with torch.no_grad():
                    fn(*args)
        else:
            out = fn(*args)
            dout = torch.randn_like(out)
            if mode == "bwd":

                def call():
                    out.backward(dout, retain_graph=True)
            else:

                def call():
                    fn(*args).backward(dout)

        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if cuda_graph:
            ms = do_bench_cudagraph(call, rep=50, grad_to_none=leaves, return_mode="median")
        else:
            ms = do_bench(call, warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
        return ms, peak, None
    except Exception as exc:  # noqa: BLE001 - a backend that does not support the shape/dtype: record why, keep going
        torch.cuda.empty_cache()
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def bench_attention(
    shapes, modes, dtype=torch.bfloat16, causal=True, device="cuda", heads=32, kv_heads=32, dim=128, cuda_graph=False
):
    rows = []
    providers = _attention_providers(causal, gqa=kv_heads != heads)
    for bsz, seq in shapes:
        frac = 0.3
        q, k, v, g = _attn_inputs(bsz, seq, heads, kv_heads, dim, frac, dtype, device)
        fwd_flops = 4 * bsz * heads * seq * seq * dim * (0.5 if causal else 1.0)
        for mode in modes:
            flops = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * fwd_flops
            times = {}
            for name, fn in providers.items():
                if name == "eager_ref" and seq > 4096:
                    rows.append(
                        {
                            "op": "attention",
                            "shape": f"{bsz}x{seq} {heads}/{kv_heads}h",
                            "mode": mode,
                            "provider": name,
                            "skipped": "T > 4096: the (T, T) score matrices do not fit",
                        }
                    )
                    continue
                with _PROVIDER_CONTEXT.get(name, contextlib.nullcontext)():
                    ms, peak, err = _measure(fn, (q, k, v, g), [q, k, v, g], mode, cuda_graph)
                row = {
                    "op": "attention",
                    "shape": f"{bsz}x{seq} {heads}/{kv_heads}h",
                    "B": bsz,
                    "T": seq,
                    "H": heads,
                    "Hkv": kv_heads,
                    "D": dim,
                    "causal": causal,
                    "dtype": str(dtype),
                    "mode": mode,
                    "provider": name,
                    "visual_fraction": frac,
                }
                rows.append(_provider_row(row, (ms, peak, err), times, "tflops", flops / 1e9))
            _add_ratios(rows, times)
        del q, k, v, g
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_adapter(shapes, modes, fracs, dtype=torch.bfloat16, device="cuda", d=4096, r=32, experts=2, cuda_graph=False):
    rows = []
    providers = _adapter_providers()
    elt = torch.finfo(dtype).bits // 8
    w_bytes = 3 * experts * r * d * 4
    for bsz, seq in shapes:
        for frac in fracs:
            x, route, ws = _adapter_inputs(bsz, seq, d, r, experts, frac, dtype, device)
            n = bsz * seq
            for mode in modes:
                nbytes = {
                    "fwd": 2 * n * d * elt + w_bytes,
                    "bwd": 3 * n * d * elt + 2 * w_bytes,
                    "fwd+bwd": 5 * n * d * elt + 3 * w_bytes,
                }[mode]
                times = {}
                for name, fn in providers.items():
                    ms, peak, err = _measure(fn, (x, route, *ws), [x, *ws], mode, cuda_graph)
                    row = {
                        "op": "adapter",
                        "shape": f"{bsz}x{seq}",
                        "B": bsz,
                        "T": seq,
                        "d": d,
                        "r": r,
                        "experts": experts,
                        "dtype": str(dtype),
                        "mode": mode,
                        "provider": name,
                        "visual_fraction": frac,
                    }
                    rows.append(_provider_row(row, (ms, peak, err), times, "gbps", nbytes / 1e6))
                _add_ratios(rows, times)
            del x, route, ws
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def _provider_row(row: dict, measured: tuple, times: dict, rate_key: str, work: float) -> dict:
    """Finish one provider's row from `_measure`'s (ms, peak, reason): why it was skipped, or its time, its rate
    (`work` per ms under `rate_key`) and peak memory; a timed provider joins `times` for `_add_ratios`."""
    ms, peak, err = measured
    if err:
        row["skipped"] = err
    else:
        times[row["provider"]] = ms
        row.update({"ms": ms, rate_key: work / ms, "peak_mib": peak})
    return row


def _add_ratios(rows, times):
    """speedup = baseline time / triton time, written on the triton row of this (shape, mode) group."""
    if "triton" not in times:
        return
    for row in reversed(rows):
        if row.get("provider") == "triton":
            row["speedup_vs"] = {k: t / times["triton"] for k, t in times.items() if k != "triton"}
            return


# ---------------------------------------------------------------------------------------------------------- output
def _env(argv) -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA; Triton interpreter smoke)"
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": "python -m kernels.bench " + " ".join(argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _markdown(env, rows, smoke=None) -> str:
    lines = [
        (
            f"# Kernel benchmark\n\n- device: {env['device']}\n- torch {env['torch']}, triton {env['triton']}, "
            f"CUDA {env['cuda']}\n- command: `{env['command']}`\n- time: {env['time_utc']}\n"
        )
    ]
    if smoke is not None:
        lines.append(f"{NO_CUDA}.\n\nSmoke check: {smoke}\n")
    for op, metric in (("attention", "tflops"), ("adapter", "gbps")):
        sel = [r for r in rows if r["op"] == op]
        if not sel:
            continue
        unit = "TFLOP/s" if metric == "tflops" else "GB/s"
        lines.append(
            f"\n## {op}\n\n| shape | vis | mode | provider | ms | {unit} | peak MiB | triton speedup |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for r in sel:
            if "skipped" in r:
                lines.append(
                    f"| {r['shape']} | {r.get('visual_fraction', '')} | {r['mode']} | {r['provider']} | "
                    f"skipped: {r['skipped']} | | | |"
                )
                continue
            sp = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("speedup_vs", {}).items())
            lines.append(
                f"| {r['shape']} | {r['visual_fraction']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | "
                f"{r[metric]:.1f} | {r['peak_mib']:.0f} | {sp} |"
            )
    return "\n".join(lines) + "\n"


def _write(out: Path, env, rows, smoke=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps({"env": env, "smoke": smoke, "rows": rows}, indent=1))
    (out / "kernels_bench.md").write_text(_markdown(env, rows, smoke))
    print(f"wrote {out / 'kernels_bench.json'} and {out / 'kernels_bench.md'}")


# ---------------------------------------------------------------------------------------------------------- smoke
def smoke() -> str:
    """Both ops, forward and every gradient, through the Triton interpreter on tiny shapes vs the references."""
    torch.manual_seed(0)
    worst = {}
    q, k, v, g = _attn_inputs(2, 21, 4, 2, 32, 0.3, torch.float32, "cpu")
    for causal in (True, False):
        out = gated_attention(q, k, v, g, causal=causal)  # the custom op training calls
        ref = gated_attention_ref(q, k, v, g, causal=causal)
        do = torch.randn_like(out)
        got = [out, *torch.autograd.grad(out, [q, k, v, g], do)]
        want = [ref, *torch.autograd.grad(ref, [q, k, v, g], do)]
        worst[f"attention causal={causal}"] = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
    x, route, ws = _adapter_inputs(2, 40, 64, 16, 2, 0.5, torch.float32, "cpu")
    out = routed_swiglu_adapter(x, route, *ws)  # the custom op training calls
    ref = routed_swiglu_adapter_ref(x, route, *ws)
    dy = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, [x, *ws], dy)]
    want = [ref, *torch.autograd.grad(ref, [x, *ws], dy)]
    worst["adapter"] = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
    summary = ", ".join(f"{k}: max abs err {v:.1e}" for k, v in worst.items())
    if max(worst.values()) > 1e-4:
        raise SystemExit(f"SMOKE FAILED: {summary}")
    return f"{SMOKE_OK}: interpreter results match the references (forward and all gradients; {summary})"


def compile_report(
    head_dims,
    ops,
    arch: int = 90,
    json_path: Path | None = None,
    other_triton: Path | None = None,
    kernels: str | None = None,
) -> str:
    """Compile every launch the launchers pick at the headline shapes for sm_<arch>a and print the PTX/ptxas
    figures (kernels/compile_report.py; no GPU needed). Needs TRITON_INTERPRET unset. ``other_triton``: a
    directory holding another Triton; the same report runs there in a child process, then both side by side."""

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--compile-report compiles for the GPU: unset TRITON_INTERPRET")
    print(
        f"Compile report: triton {triton.__version__}, sm_{arch}a, bf16, runtime specialisation (16-byte "
        f"alignment, ints % 16), ptxas -v; grid vs {cr.H100_SMS} SMs\n\n{cr.HEADER}",
        flush=True,
    )
    parts = [k for k in (kernels or "").split(",") if k]
    only = (lambda _case, tag: any(k in tag for k in parts)) if parts else None
    rows = cr.report(head_dims=head_dims, ops=ops, arch=arch, echo=lambda r: print(r, flush=True), only=only)
    if "adapter" in ops and only is None:
        print(f"\nAdapter HBM traffic model (per token)\n\n{cr.adapter_traffic(rows)}", flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps({"env": _env(sys.argv[1:]), "arch": f"sm_{arch}a", "kernels": cr.as_json(rows)}, indent=1)
        )
    if other_triton is not None:
        version, other = _compile_report_under(other_triton, head_dims, ops, kernels)
        print(
            f"\nSide by side: triton {triton.__version__} / {version}\n\n"
            f"{cr.side_by_side(rows, other, triton.__version__, version)}",
            flush=True,
        )
    return f"COMPILE OK: {len(rows)} kernel launches built for sm_{arch}a"


def _compile_report_under(triton_dir: Path, head_dims, ops, kernels: str | None = None) -> tuple[str, list]:
    """The same report in a child process whose PYTHONPATH puts triton_dir first: (its Triton version, rows)."""
    if not (triton_dir / "triton").is_dir():
        raise SystemExit(
            f"--triton {triton_dir}: no triton package there (pip install --no-deps --target DIR triton==X)"
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(triton_dir), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    out = Path(tempfile.mkdtemp()) / "compile_report.json"
    cmd = [
        sys.executable,
        "-m",
        f"{__package__}.bench",
        "--compile-report",
        "--ops",
        ",".join(ops),
        "--head-dims",
        ",".join(str(d) for d in head_dims),
        "--json",
        str(out),
    ] + (["--kernels", kernels] if kernels else [])
    print(f"\n$ PYTHONPATH={triton_dir} {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    data = json.loads(out.read_text())
    return data["env"]["triton"], cr.from_json(data["kernels"])


def _shapes(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError as exc:
        raise SystemExit(f"kernels.bench: shapes must look like 4x512,2x2048, got {text!r}") from exc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="headline shapes only: attention 2x2048 causal d128 (32/32 and 32/8 heads), "
        "adapter 2x2048 and 1x8192 at visual fraction 0.3",
    )
    ap.add_argument("--out", type=Path, default=Path("results"), help="directory for kernels_bench.{json,md}")
    ap.add_argument("--ops", default="attention,adapter", help="comma list of attention, adapter")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, fwd+bwd")
    ap.add_argument(
        "--compile-report",
        action="store_true",
        help="compile every headline launch for sm_90a and print wgmma/registers/spills/occupancy "
        "(no GPU needed; TRITON_INTERPRET unset)",
    )
    ap.add_argument("--head-dims", default="64,80,96,128,256", help="attention head dims of the compile report")
    ap.add_argument(
        "--kernels",
        default=None,
        help="compile report: only kernels whose name contains one of these comma-separated parts",
    )
    ap.add_argument(
        "--triton",
        type=Path,
        default=os.environ.get("PILL_OTHER_TRITON") or None,
        help="compile report: also run it under the Triton installed in this directory (child process "
        "with it first on PYTHONPATH; env PILL_OTHER_TRITON) and print both side by side",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    ap.add_argument("--attn-shapes", default=None, help="BxT list, e.g. 4x512,2x2048 (default: the sweep)")
    ap.add_argument("--adapter-shapes", default=None, help="BxT list for the adapter (default: the sweep)")
    ap.add_argument("--heads", type=int, default=32, help="attention query heads")
    ap.add_argument(
        "--kv-heads",
        type=int,
        default=None,
        help="attention KV heads (GQA; Llama-3-8B: --heads 32 --kv-heads 8); default = --heads",
    )
    ap.add_argument("--dim", type=int, default=128, help="attention head dim")
    ap.add_argument("--no-causal", action="store_true", help="non-causal attention")
    ap.add_argument("--fractions", default=None, help="adapter visual fractions, e.g. 0.1,0.5")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    ap.add_argument("--smoke-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.compile_report:
        head_dims = [int(x) for x in args.head_dims.split(",") if x]
        print(
            compile_report(
                head_dims, args.ops.split(","), json_path=args.json, other_triton=args.triton, kernels=args.kernels
            )
        )
        return 0

    if args.smoke_child:  # runs with TRITON_INTERPRET=1 set before triton was imported
        print(smoke())
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", f"{__package__}.bench", "--smoke-child"],
            env=env,
            text=True,
            check=False,
            capture_output=True,
        )
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            return proc.returncode
        _write(args.out, _env(argv), [], smoke=proc.stdout.strip().splitlines()[-1])
        return 0

    ops = args.ops.split(",")
    modes = args.modes.split(",")
    rows = []
    if "attention" in ops:
        shapes = _shapes(args.attn_shapes) or (ATTN_SHAPES_QUICK if args.quick else ATTN_SHAPES)
        kv = args.kv_heads or args.heads
        rows += bench_attention(
            shapes,
            modes,
            causal=not args.no_causal,
            heads=args.heads,
            kv_heads=kv,
            dim=args.dim,
            cuda_graph=args.cuda_graph,
        )
        if args.quick and args.kv_heads is None:  # the quick check also covers Llama-3-8B GQA (32 q / 8 kv)
            rows += bench_attention(
                shapes, modes, causal=not args.no_causal, heads=32, kv_heads=8, dim=args.dim, cuda_graph=args.cuda_graph
            )
    if "adapter" in ops:
        fracs = (
            [float(f) for f in args.fractions.split(",")]
            if args.fractions
            else ([0.3] if args.quick else VISUAL_FRACTIONS)
        )
        rows += bench_adapter(
            _shapes(args.adapter_shapes) or (ADAPTER_SHAPES_QUICK if args.quick else ADAPTER_SHAPES),
            modes,
            fracs,
            cuda_graph=args.cuda_graph,
        )
    env = _env(argv)
    _write(args.out, env, rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(_markdown(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
