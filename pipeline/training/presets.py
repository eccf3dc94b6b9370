"""Shipped presets (package data) and the prepare steps a preset runs before training.

`--config demo` / `--ds_config zero3` name files shipped inside the package (pipeline/configs/*.yaml,
pipeline/ds_configs/*.json, read through importlib.resources so a non-editable install finds them); a path that
exists is used as it is. A preset's `prepare` steps (the demo builds its shards) run as `python -m <module>`
subprocesses on global rank 0, so the trainer itself imports no data builder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch.distributed as dist

from pipeline.training.config import ConfigError, PrepareStep

STAMP = ".prepared.json"


def resolve_preset(name_or_path: str, folder: str, suffix: str) -> str:
    """An existing path as given; else the shipped file `folder/<name>` (with or without `suffix`)."""
    if Path(name_or_path).is_file():
        return name_or_path
    name = Path(name_or_path).name
    shipped = resources.files("pipeline") / folder / (name if name.endswith(suffix) else name + suffix)
    if shipped.is_file():
        return str(shipped)
    return name_or_path  # the loader reports it as missing, naming the flag


def run_prepare_steps(steps: list[PrepareStep], is_main: bool) -> None:
    """Run each step once (rank 0; skipped when its directory holds the stamp of the same command); all wait."""
    if is_main:
        for step in steps:
            _run_step(step)
    if dist.is_initialized():
        dist.barrier()


def _run_step(step: PrepareStep) -> None:
    cmd = [sys.executable, "-m", step.module, *map(str, step.args)]
    stamp = Path(step.creates) / STAMP if step.creates else None
    record = {"module": step.module, "args": list(map(str, step.args))}
    if stamp is not None and stamp.is_file() and json.loads(stamp.read_text()) == record:
        return
    print(f"prepare: {' '.join(cmd[1:])}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(
            f"prepare step `python -m {step.module}` failed (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-2000:]}"
        )
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(record))
