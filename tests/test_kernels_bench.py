"""`python -m kernels.bench --quick` on a machine without CUDA: says so, smoke-checks both ops, exits 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_without_cuda_runs_smoke(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # force the no-GPU path even on a GPU host
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA device" in proc.stdout
    assert "SMOKE OK" in proc.stdout
    result = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert result["smoke"].startswith("SMOKE OK") and result["env"]["command"].startswith("python -m kernels.bench")
    assert "SMOKE OK" in (tmp_path / "kernels_bench.md").read_text()


def _ptxas() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


needs_ptxas = pytest.mark.skipif(not _ptxas(), reason="this triton wheel ships no ptxas to compile for sm_90 with")


def _compile_report(tmp_path, *args) -> list[dict]:
    """`python -m kernels.bench --compile-report` in a child without TRITON_INTERPRET (it compiles for sm_90a)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--compile-report", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COMPILE OK" in proc.stdout and "| wgmma |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["arch"] == "sm_90a"
    return report["kernels"]


@needs_ptxas
def test_compile_report_adapter_fills_the_gpu(tmp_path):
    """Issue 20 item 4's layout: a fused forward and a dA pass over 16-token blocks (x and dy read from HBM once
    there; their dots are r = 32 wide, memory bound, so mma.sync by design) and a dW/dx pass on wgmma. At n >= 2048
    every SM of an H100 gets a block of each, and nothing spills."""
    rows = _compile_report(tmp_path, "--ops", "adapter")
    assert {r["case"].split()[1] for r in rows} == {"n2048", "n8192"}
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_routed_adapter_fwd_kernel", "_routed_adapter_bwd_dh_kernel", "_routed_adapter_bwd_dw_kernel"}
    for r in rows:
        assert r["programs"] >= 128, r  # 2048 / 16 token blocks: one per SM of 132, the last wave 97% full
        assert r["spill_bytes"] == 0, r
        if r["kernel"] == "_routed_adapter_bwd_dw_kernel":
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r


@needs_ptxas
@pytest.mark.slow
def test_compile_report_attention_is_wgmma_without_spills(tmp_path):
    """Issue 13: at head_dim 64 and 128 every bf16 dot of the forward, dK/dV and dQ kernels is wgmma, and none
    spills (causal gated GQA and non-causal ungated MHA)."""
    rows = _compile_report(tmp_path, "--ops", "attention", "--head-dims", "64,128")
    dot_kernels = [r for r in rows if r["case"].startswith("attn") and r["kernel"] != "_bwd_delta_kernel"]
    cases = {r["case"] for r in dot_kernels}  # 2 head dims x (gated GQA, ungated MHA), + SmolLM2's 9/3 at d64
    assert len(cases) >= 2 * 2 and len(dot_kernels) == 3 * len(cases), sorted(cases)
    assert any("9/3h" in c for c in cases), sorted(cases)
    decode = [r for r in rows if r["case"].startswith("decode")]  # 16 query rows: mma.sync by design
    assert len(decode) == 2 and all(r["programs"] >= 132 and r["spill_bytes"] == 0 for r in decode), decode
    for r in dot_kernels:
        assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
        assert r["spill_bytes"] == 0, r
    assert all(r["spill_bytes"] == 0 for r in rows)


def test_compile_report_occupancy_and_specialisation_rules():
    """The H100 occupancy arithmetic and the runtime's specialisation rules the report compiles with."""
    import torch
    from pill_kernels.compile_report import _specialize, ctas_per_sm

    assert ctas_per_sm(regs=255, num_warps=8, shared=128 * 1024) == 1  # registers and shared memory both bind
    assert ctas_per_sm(regs=128, num_warps=4, shared=32 * 1024) == 4  # 64 K regs / (128 x 128 threads)
    assert ctas_per_sm(regs=32, num_warps=4, shared=0) == 16  # 2048 threads / 128
    t = torch.empty(64, dtype=torch.bfloat16, device="meta")
    assert _specialize(t) == ("*bf16", "D")  # 16-byte aligned
    assert _specialize(4096) == ("i32", "D") and _specialize(4095)[1] == ""
    assert _specialize(1)[0] == "constexpr"  # ints equal to 1 become constants
    assert _specialize(4096, specialize=False)[1] in ("", None)  # do_not_specialize
