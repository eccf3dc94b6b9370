"""Merge the GPU check's stage outputs into <out>/<device>-<date>.json and .md (called by scripts/gpu_check.sh).

    python scripts/gpu_report.py --work WORK_DIR --out results [--dry-run]

WORK_DIR holds stages.txt ("name exit_code seconds" lines), <name>.log per stage (the report keeps their last 40
lines), tests.xml (pytest's JUnit XML), kernels/kernels_bench.{json,md} and pipeline.{json,md}; a stage that failed
or timed out may have left none of its files, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch


def read_stages(work: Path) -> dict[str, dict[str, int]]:
    stages = {}
    path = work / "stages.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, secs = line.split()
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
        # 124/137: killed by the stage's time limit
        stages[name] = {"exit_code": int(rc), "seconds": int(secs), "log_tail": tail}
    return stages


def read_tests(work: Path) -> dict[str, int] | None:
    path = work / "tests.xml"
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_name(pipeline: dict | None, dry_run: bool) -> str:
    if dry_run:
        return "cpu-dry-run"
    if pipeline and pipeline.get("gpu"):
        return pipeline["device"]
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def markdown(report: dict[str, Any], kernels_md: str | None, pipeline_md: str | None) -> str:
    lines = [
        f"# GPU check: {report['device']}, {report['date']}",
        "",
        "| stage | exit code | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['exit_code']} | {v['seconds']} |" for k, v in report["stages"].items()]
    t = report["tests"]
    lines += [
        "",
        "## bf16 GPU tests (`pytest -m gpu`)",
        "",
        f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        if t
        else "no test report (the stage did not finish)",
    ]
    lines += [
        "",
        "## Kernels (`python -m kernels.bench --quick`)",
        "",
        kernels_md.split("\n", 1)[1].strip() if kernels_md else "no kernel results (the stage did not finish)",
    ]
    lines += [
        "",
        "## End-to-end stage 2 (`python -m pipeline.bench`)",
        "",
        pipeline_md.strip() if pipeline_md else "no pipeline results (the stage did not finish)",
    ]
    if report["dry_run"]:
        lines += ["", "Dry run on CPU at tiny shapes: the figures check the script, not a GPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    pipeline = read_json(args.work / "pipeline.json")
    kernels = read_json(args.work / "kernels" / "kernels_bench.json")
    device = device_name(pipeline, args.dry_run)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    report = {
        "device": device,
        "date": date,
        "dry_run": args.dry_run,
        "stages": read_stages(args.work),
        "tests": read_tests(args.work),
        "kernels": kernels,
        "pipeline": pipeline,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{device_slug(device)}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    kmd, pmd = args.work / "kernels" / "kernels_bench.md", args.work / "pipeline.md"
    stem.with_suffix(".md").write_text(
        markdown(report, kmd.read_text() if kmd.is_file() else None, pmd.read_text() if pmd.is_file() else None)
    )
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
