"""Preemption that always checkpoints (issue 28, item 2), whichever way SIGTERM arrives.

`kill -TERM -- -PGID` and `timeout` signal every process of the job, DataLoader workers included (they must not
die of it: the main process decides); a SIGTERM to the `deepspeed` command kills only that command, whose ranks
must notice and stop. Each path ends with a complete checkpoint at the last logged step and exit 99 (the rank's);
the process-group path then resumes to the uninterrupted run's exact loss curve.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.reliability import (
    PY,
    build_workdir,
    finish,
    free_port,
    losses,
    run,
    start,
    train_cmd,
    wait_for_step,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 400  # far more than the few steps before the signal: it always lands mid-run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("rel_preempt"))


def _config(workdir, name, workers, steps=STEPS):
    return write_config(
        workdir,
        name,
        **{
            "stages.0.max_steps": steps,
            "data.num_workers": workers,
            "checkpoint.every_steps": 0,  # the only checkpoint is the preemption's
            # a constant lr: the schedule does not depend on max_steps, so a shorter reference run is comparable
            "stages.0.warmup_steps": 0,
            "stages.0.min_lr_ratio": 1.0,
        },
    )


def _assert_checkpointed(run_dir, out, total=STEPS):
    """latest names a complete checkpoint at the last logged step, written by the stop request."""
    assert "exiting 99" in out, out[-6000:]
    assert "killed by signal" not in out, out[-6000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())
    assert meta["step"] == max(losses(run_dir)) < total, (meta, out[-3000:])
    return meta["step"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_process_group_checkpoints_and_exits_99(workdir, workers):
    name = f"pgid{workers}"
    p = start(train_cmd(_config(workdir, name, workers)), workdir)
    wait_for_step(workdir / name, 2, p)
    os.killpg(p.pid, signal.SIGTERM)  # kill -TERM -- -PGID: the rank and its DataLoader workers
    rc, out = finish(p)
    assert rc == 99, out[-6000:]
    step = _assert_checkpointed(workdir / name, out)
    if workers == 2:
        # The exact resume: the same curve as a run that was never interrupted (its first steps suffice).
        steps = step + 2
        resumed = run(train_cmd(_config(workdir, name, workers, steps=steps)), workdir)
        assert resumed.returncode == 0 and f"resumed at step {step}" in resumed.stdout, resumed.stdout[-4000:]
        ref = run(train_cmd(_config(workdir, f"{name}_ref", workers, steps=steps)), workdir)
        assert ref.returncode == 0, ref.stdout[-4000:]
        assert losses(workdir / name) == losses(workdir / f"{name}_ref")


def test_timeout_with_workers_checkpoints_and_exits_99(workdir):
    # timeout(1) signals its whole process group when the time is up, like `kill -- -PGID`.
    cfg = _config(workdir, "timeout", 2, steps=100_000)
    cmd = ["timeout", "--preserve-status", "-s", "TERM", "60", *train_cmd(cfg)]
    rc, out = finish(start(cmd, workdir), timeout=400)
    assert rc == 99, out[-6000:]
    _assert_checkpointed(workdir / "timeout", out, total=100_000)


@pytest.mark.parametrize("target", ["launcher", "group"])
def test_sigterm_to_the_deepspeed_launcher_stops_the_ranks_with_a_checkpoint(workdir, target):
    name = f"ds_{target}"
    cfg = _config(workdir, name, 2)
    deepspeed = [str(Path(PY).parent / "deepspeed")]  # the console script, as a user types it
    p = start(
        [*deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "pipeline/train.py", "--config", str(cfg)],
        workdir,
    )
    wait_for_step(workdir / name, 2, p)
    tree = psutil.Process(p.pid).children(recursive=True)
    if target == "launcher":
        p.send_signal(signal.SIGTERM)  # only the `deepspeed` command: it dies without forwarding it
    else:
        os.killpg(p.pid, signal.SIGTERM)
    _, out = finish(p)  # the ranks keep the output pipe open until they have exited
    _, alive = psutil.wait_procs(tree, timeout=120)
    assert not alive, [a.cmdline() for a in alive]
    assert out.count("exiting 99") >= 1, out[-6000:]
    _assert_checkpointed(workdir / name, out)
