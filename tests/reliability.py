"""Shared set-up of the tests/test_reliability_*.py files: a tiny demo data set, the tiny random PILL, and
single-process or launcher runs of pipeline/train.py with a config written per test (the demo's stage 2, a few
steps)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_workdir(root: Path) -> Path:
    """Tiny model dirs + a small demo shard set (2 train shards)."""
    from pipeline.model.tiny import build_tiny_pill_dirs
    from shards.demo import DemoConfig, build_demo

    build_demo(DemoConfig(n_train=64, n_val=16, seed=0), root / "data", max_samples=32)
    build_tiny_pill_dirs(root / "tiny")
    return root


def write_config(workdir: Path, name: str, **over) -> Path:
    """A one-stage fp32 run of the tiny PILL on the demo shards; `over`: dotted keys (stages.0.max_steps=...)."""
    cfg = {
        "name": name,
        "output_dir": str(workdir / name),
        "seed": 0,
        "precision": "fp32",
        "model": {"llm_path": "tiny", "vpg_path": "tiny", "options": {"rank": 8}},
        "data": {"max_length": 160, "num_workers": 0, "shuffle_buffer": 16, "sqa_format": "QCM-A"},
        "stages": [
            {
                "stage": 2,
                "task": "scienceqa",
                "train_shards": [str(workdir / "data" / "train-index.json")],
                "max_steps": 6,
                "micro_batch_size": 2,
                "grad_accum": 1,
                "lr": 1e-2,
                "warmup_steps": 1,
            }
        ],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "log": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        "eval": {"enabled": False},
    }
    for k, v in over.items():
        cur = cfg
        *path, last = k.split(".")
        for p in path:
            cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
        cur[last] = v
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(workdir: Path, **extra: str) -> dict[str, str]:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "PILL_TINY_DIR": str(workdir / "tiny"), "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def train_cmd(config: Path, *extra: str) -> list[str]:
    return [PY, str(REPO / "pipeline" / "train.py"), "--config", str(config), *extra]


def run(cmd: list[str], workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def start(cmd: list[str], workdir: Path, **kw) -> subprocess.Popen:
    """In a new session (its own process group), as a shell or a batch system starts a job."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def steps_logged(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 400) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}):\n{proc.stdout.read()[-6000:]}")
        steps = steps_logged(run_dir)
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"did not end in {timeout}s:\n{out[-6000:]}") from None
    return proc.returncode, out
