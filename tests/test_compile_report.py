"""Hopper readiness rules on the compile report (issue 20), under the installed Triton, without a GPU.

Each kernel is compiled for sm_90a from the launchers' own choices at the headline shapes (kernels/compile_report.py)
and ptxas reports its registers and spills. Rules: no spill at head dim <= 128 in any kernel (attention, decode,
adapter); each gated attention kernel's narrowest wgmma N no narrower than the same kernel's in the ungated case
at the same head dim; no spill in the d256 dQ kernel; K/V through TMA in the forward and dQ. The report runs in a
child process (the kernels must be compiled, so TRITON_INTERPRET, which the test session sets, is unset there);
~45 launches, a few minutes on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL_DIMS = "64,80,96,128"


def _report(tmp: Path, head_dims: str, ops: str, kernels: str | None = None) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "kernels.bench",
        "--compile-report",
        "--ops",
        ops,
        "--head-dims",
        head_dims,
        "--json",
        str(out),
    ] + (["--kernels", kernels] if kernels else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["kernels"]


def _name(r: dict) -> str:
    return f"{r['case']} {r['kernel']} ({r['config']})"


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("cr"), SMALL_DIMS, "attention,adapter")


def test_no_spill_at_head_dim_up_to_128(small_rows):
    spills = [f"{_name(r)}: {r['spill_bytes']} B, {r['regs']} regs" for r in small_rows if r["spill_bytes"]]
    assert not spills, "spills at d <= 128:\n" + "\n".join(spills)


def test_gated_kernels_no_narrower_than_ungated(small_rows):
    """Twin: the same kernel in the ungated case at the same head dim."""
    ungated = {}
    for r in small_rows:
        if r["case"].startswith("attn") and "nogate" in r["case"]:
            ungated.setdefault((r["case"].split()[1], r["kernel"]), r)
    narrower = []
    for r in small_rows:
        if not (r["case"].startswith("attn") and " gated " in r["case"]):
            continue
        twin = ungated.get((r["case"].split()[1], r["kernel"]))
        if twin is not None and twin["wgmma_n"] and r["wgmma_n"] < twin["wgmma_n"]:
            narrower.append(f"{_name(r)}: N={r['wgmma_n']} < ungated N={twin['wgmma_n']} ({twin['config']})")
    assert not narrower, "gated wgmma narrower than ungated:\n" + "\n".join(narrower)


def test_report_covers_smollm2_shape(small_rows):
    assert any("d64" in r["case"] and "9/3h" in r["case"] for r in small_rows)


def test_grids_fill_the_sms_at_smollm2_and_llama2_shapes(small_rows):
    """SmolLM2-135M (d64, 9/3 heads) and LLaMA-2-7B (d128, 32/32 heads), causal gated at 2 x 2048: every
    attention kernel's grid has at least one program per H100 SM (132)."""
    cases = ("attn d64 causal gated 9/3h", "attn d128 causal gated 32/32h")
    rows = [r for r in small_rows if r["case"].startswith(cases) and "_gated_attn_" in r["kernel"]]
    assert {r["case"].rsplit(" ", 1)[0] for r in rows} == set(cases)
    short = [f"{_name(r)}: {r['programs']} programs" for r in rows if r["programs"] < 132]
    assert not short, "grids below 132 programs:\n" + "\n".join(short)


def test_no_spill_in_d256_dq(tmp_path):
    rows = [r for r in _report(tmp_path, "256", "attention", kernels="dq") if r["case"].startswith("attn")]
    assert rows, "no d256 dQ launch found"
    spills = [f"{_name(r)}: {r['spill_bytes']} B, {r['regs']} regs" for r in rows if r["spill_bytes"]]
    assert not spills, "d256 dQ spills:\n" + "\n".join(spills)


def test_forward_and_dq_load_kv_through_tma(small_rows):
    """Where the installed Triton builds tensor descriptors, the forward and dQ kernels load K/V with TMA
    (cp.async.bulk.tensor), and at d64-d128 the forward's softmax overlaps a wgmma: some of its exp2s execute
    while a wgmma group is in flight (the look-ahead loop, _fwd_inner_overlap)."""
    triton_lang = pytest.importorskip("triton.language")
    if not hasattr(triton_lang, "make_tensor_descriptor"):
        pytest.skip("this Triton has no tensor descriptors: pointer loads are the path")
    kv_kernels = [r for r in small_rows if r["kernel"] in ("_gated_attn_fwd_kernel", "_gated_attn_bwd_dq_kernel")]
    assert kv_kernels and all(r["tma"] > 0 for r in kv_kernels), [_name(r) for r in kv_kernels if not r["tma"]]
    fwd = [r for r in kv_kernels if r["kernel"] == "_gated_attn_fwd_kernel"]
    assert fwd and all(r["ex2_overlap"] > 0 for r in fwd), [(_name(r), r["ex2_overlap"]) for r in fwd]


def test_in_order_forward_at_d128_runs_128_key_tiles(tmp_path, monkeypatch):
    """PILL_ATTN_OVERLAP=0 (the in-order TMA forward, timed beside the overlapped one): 128-key tiles at d128,
    both matmuls at wgmma N 128, no spill, and no exp2 in flight (the in-order loop waits before its softmax)."""
    monkeypatch.setenv("PILL_ATTN_OVERLAP", "0")
    rows = [r for r in _report(tmp_path, "128", "attention", kernels="fwd_kernel") if r["case"].startswith("attn")]
    assert rows and all(r["wgmma_n"] >= 128 and r["spill_bytes"] == 0 for r in rows), [
        (_name(r), r["wgmma_n"], r["spill_bytes"]) for r in rows
    ]
    assert all(r["ex2_overlap"] == 0 for r in rows)
