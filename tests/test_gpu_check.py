"""scripts/gpu_check.sh --dry-run: the GPU check's stages on CPU at tiny shapes, so the script cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    (report_path,) = out.glob("cpu-dry-run-*.json")
    report = json.loads(report_path.read_text())
    assert report["dry_run"] and set(report["stages"]) == {"tests", "kernels", "pipeline"}
    assert all(s["exit_code"] == 0 for s in report["stages"].values()), report["stages"]
    assert report["tests"]["tests"] >= 1 and report["tests"]["failures"] == report["tests"]["errors"] == 0
    assert report["kernels"]["smoke"] and report["pipeline"]["results"]
    md = report_path.with_suffix(".md").read_text()
    assert "## Kernels" in md and "| point |" in md and "Dry run on CPU" in md


def test_gpu_check_rejects_unknown_arguments():
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


def test_makefile_target():
    # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    r = subprocess.run(
        ["make", "--no-print-directory", "-n", "gpu-check", "GPU_CHECK_ARGS=--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and r.stdout.strip() == "bash scripts/gpu_check.sh --dry-run", r.stdout + r.stderr


def test_without_a_gpu_it_stops_at_once_and_names_the_dry_run(tmp_path):
    """On a host without CUDA (and not --dry-run) the check refuses before installing or running anything."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(PILL_PYTHON=sys.executable, PILL_WHEELS=str(tmp_path / "none"), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stdout + r.stderr and "--dry-run" in r.stdout + r.stderr
    assert not list((tmp_path / "out").glob("*.json"))
