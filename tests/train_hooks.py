"""The trainer with test-only hooks: `python tests/train_hooks.py <pipeline/train.py's arguments>`.

Tests that must break a real multi-process run (a NaN loss on one rank, a run slow enough to be killed or signalled
mid-way) start their ranks through this file instead of pipeline/train.py; the hooks are monkeypatched onto the
trainer here, so production code carries none. Configured by environment variables (read once per process):

- PILL_TEST_NAN_AT=2,3 : the loss of these micro-steps (counted from 0 in each process) becomes NaN;
- PILL_TEST_NAN_RANK=1 : ... on this global rank only (default: every rank);
- PILL_TEST_SLEEP_PER_STEP=0.4 : seconds to sleep after each optimizer step;
- PILL_TEST_CRASH_BEFORE_STEP=7 : the process dies (exit 3, no clean-up, like a node failure) as optimizer step 7
  starts, after step 6's checkpoint (if the cadence writes one);
- PILL_TEST_WORKERS_BY_RANK=0,2 : data.num_workers per global rank (rank 0: 0, rank 1: 2), so one 2-rank run has a
  rank without DataLoader workers and a rank with them (preemption tests: both kinds under one signal).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repo root (pipeline, tests) must be importable
    sys.path.insert(0, str(REPO))

import pipeline.train  # noqa: E402, F401  (first: it installs the early SIGTERM/SIGUSR1 handlers)
from pipeline.training import data_glue, loop  # noqa: E402
from pipeline.training.loss import Loss  # noqa: E402


def install_nan_losses(at: set[int], rank: int | None) -> None:
    """Loss.__call__ returns a NaN loss at the chosen micro-steps (the trainer's guard must skip them)."""
    real = Loss.__call__
    calls = [0]

    def nan_at_chosen(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        hit = calls[0] in at and (rank is None or rank == int(os.environ.get("RANK", "0")))
        calls[0] += 1
        return dataclasses.replace(result, loss=result.loss * float("nan")) if hit else result

    Loss.__call__ = nan_at_chosen


def install_sleep_per_step(seconds: float) -> None:
    """Each optimizer step takes `seconds` longer (loop.run_stage looks train_step up in its module)."""
    real = loop.train_step

    def slow_step(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(seconds)
        return out

    loop.train_step = slow_step


def install_crash_before_step(step: int) -> None:
    """os._exit(3) when train_step is called for optimizer step `step` (counted from 1 in this process)."""
    real = loop.train_step
    calls = [0]

    def crashing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os._exit(3)
        return real(*args, **kwargs)

    loop.train_step = crashing_step


def install_workers_by_rank(counts: list[int]) -> None:
    """The trainer's loader gets data.num_workers = counts[RANK] (data_glue looks build_loader up in its module)."""
    real = data_glue.build_loader
    workers = counts[int(os.environ.get("RANK", "0"))]

    def build_loader(cfg, *args, **kwargs):
        return real(dataclasses.replace(cfg, num_workers=workers), *args, **kwargs)

    data_glue.build_loader = build_loader


def install_from_env() -> None:
    if os.environ.get("PILL_TEST_NAN_AT"):
        rank = os.environ.get("PILL_TEST_NAN_RANK")
        install_nan_losses({int(x) for x in os.environ["PILL_TEST_NAN_AT"].split(",")}, int(rank) if rank else None)
    if os.environ.get("PILL_TEST_SLEEP_PER_STEP"):
        install_sleep_per_step(float(os.environ["PILL_TEST_SLEEP_PER_STEP"]))
    if os.environ.get("PILL_TEST_CRASH_BEFORE_STEP"):
        install_crash_before_step(int(os.environ["PILL_TEST_CRASH_BEFORE_STEP"]))
    if os.environ.get("PILL_TEST_WORKERS_BY_RANK"):
        install_workers_by_rank([int(x) for x in os.environ["PILL_TEST_WORKERS_BY_RANK"].split(",")])


if __name__ == "__main__":
    install_from_env()
    from pipeline.train import main

    sys.exit(main(sys.argv[1:]))
