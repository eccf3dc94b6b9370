"""Preemption that always checkpoints (issue 28, item 2), whichever way SIGTERM arrives.

One chain of runs in one run dir, one delivery path each. Every run has 2 ranks of two kinds: rank 0 reads its data
in the main process (num_workers 0), rank 1 through 2 DataLoader workers (tests/train_hooks.py
PILL_TEST_WORKERS_BY_RANK), so each path is shown for both in one run. A path's run stops with a complete
checkpoint at its last logged step and exit 99; the next run resumes from it (and is itself stopped by the next
path); the last one finishes, and the whole loss curve equals an uninterrupted run's. The ranks sleep a little
after each step (PILL_TEST_SLEEP_PER_STEP) so that the signal lands mid-run; the curve does not depend on it.

- ranks started as a job (one process group, as srun or a batch script starts them): `kill -TERM -- -PGID` and
  `timeout` reach the ranks and their DataLoader workers (which must not die of it: the main process decides);
- `python -m pipeline.launch` (DeepSpeed's launcher in a process group of its own): `kill -TERM <launcher>` and
  `kill -TERM -- -<its PGID>` reach only it; it forwards SIGTERM to the ranks and returns their 99 (`timeout`, which
  signals both, with stand-in ranks: tests/test_launch.py);
- the plain `deepspeed` command, SIGTERMed alone: it dies (143, DeepSpeed's), the ranks notice and checkpoint.

`scancel --signal=TERM` on a real Slurm is tests/test_slurm_cluster.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.reliability import PY, REPO, build_workdir, env, free_port, losses, wait_for_step, write_config

pytestmark = pytest.mark.slow

STEPS = 400  # of a run that is to be signalled: far more than the few steps before the signal
TOTAL = 16  # of the chain's last run and of the uninterrupted reference (5 stops of 1-3 steps each before)
HOOKS = str(REPO / "tests" / "train_hooks.py")
SLOW = {"PILL_TEST_SLEEP_PER_STEP": "0.3"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("rel_preempt"))


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    # One intra-op thread per rank in every run, however started: the loss curves are compared bit for bit.
    return env(workdir, PILL_TEST_WORKERS_BY_RANK="0,2", OMP_NUM_THREADS="1", **extra)


def _config(workdir: Path, name: str, steps: int) -> Path:
    return write_config(
        workdir,
        name,
        **{
            "stages.0.max_steps": steps,
            "checkpoint.every_steps": 0,  # the only checkpoints are the preemptions'
            # a constant lr: the schedule does not depend on max_steps, so the chain's last, shorter run and the
            # reference follow the same curve as the signalled runs
            "stages.0.warmup_steps": 0,
            "stages.0.min_lr_ratio": 1.0,
        },
    )


def _start_ranks(workdir: Path, cfg: Path, name: str, wrap: list[str] = (), one_group: bool = True, **extra: str):
    """Rank 0 and rank 1 of a 2-rank job, RANK/WORLD_SIZE/MASTER_* set as srun or a batch script sets them: in one
    new process group (one_group), or each in its own (under `wrap`, e.g. timeout, which makes its own group)."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        e = _env(workdir, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", **extra)
        e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        # setpgid can only join a group of the same session: a new group here, not a new session
        group = {"process_group": procs[0].pid if one_group and procs else 0}
        log = open(workdir / f"{name}.rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        cmd = [*wrap, PY, HOOKS, "--config", str(cfg)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, **group))
    return procs


def _wait_ranks(run_dir: Path, step: int, procs, name: str) -> None:
    try:
        wait_for_step(run_dir, step, _Any(procs))
    except AssertionError as e:
        out = "".join(f.read_text()[-3000:] for f in sorted(run_dir.parent.glob(f"{name}.rank*.log")))
        raise AssertionError(f"{e}\n{out}") from None


class _Any:
    """wait_for_step's view of a job: it has ended when any rank has."""

    def __init__(self, procs) -> None:
        self.procs = procs
        self.returncode = None
        self.stdout = self

    def poll(self):
        self.returncode = next((p.returncode for p in self.procs if p.poll() is not None), None)
        return self.returncode

    def kill(self) -> None:
        for p in self.procs:
            p.kill()

    def read(self) -> str:
        return ""


def _finish_ranks(workdir: Path, name: str, procs, timeout: float = 300) -> tuple[list[int], str]:
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{name}: a rank did not end in {timeout}s") from None
    return rcs, "".join((workdir / f"{name}.rank{r}.log").read_text() for r in (0, 1))


def _start_launcher(workdir: Path, cfg: Path, launcher=(PY, "-m", "pipeline.launch"), slow: bool = True):
    cmd = [*launcher, "--num_gpus", "2", "--master_port", str(free_port()), HOOKS, "--config", str(cfg)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(workdir, **(SLOW if slow else {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _assert_checkpointed(run_dir: Path, out: str, after: int) -> int:
    """latest names a complete checkpoint at the last logged step, written by the stop request; the run had
    resumed from `after` (0: a fresh run). Returns the checkpoint's step."""
    assert "exiting 99" in out, out[-6000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-6000:]
    if after:
        assert f"resumed at step {after} " in out, out[-6000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())
    assert after < meta["step"] == max(losses(run_dir)) < TOTAL, (after, meta, out[-3000:])
    return meta["step"]


@pytest.fixture(scope="module")
def reference(workdir) -> dict[int, float]:
    """The loss curve of an uninterrupted 2-rank run of TOTAL steps."""
    procs = _start_ranks(workdir, _config(workdir, "ref", TOTAL), "ref")
    rcs, out = _finish_ranks(workdir, "ref", procs)
    assert rcs == [0, 0], out[-6000:]
    curve = losses(workdir / "ref")
    assert sorted(curve) == list(range(1, TOTAL + 1))
    return curve


def _job_stopped(workdir: Path, cfg: Path, name: str, after: int, timeout: bool) -> int:
    """Ranks started as a job, stopped once they have logged a step past `after` by `kill -TERM -- -PGID` (both
    ranks in one process group) or by `timeout` per rank (as `srun timeout ...`: SIGALRM is its timer running out;
    it sends SIGTERM to the rank and to its process group). Either way rank 1's DataLoader workers get SIGTERM too.
    Returns the checkpoint's step."""
    run_dir, tag = workdir / name, f"{name}_{'timeout' if timeout else 'pgid'}"
    # --preserve-status: the rank's exit code, not 124
    wrap = ["timeout", "--preserve-status", "-s", "TERM", "600"] if timeout else []
    procs = _start_ranks(workdir, cfg, tag, wrap=wrap, one_group=not timeout, **SLOW)
    _wait_ranks(run_dir, after + 1, procs, tag)
    rank1 = psutil.Process(procs[1].pid).children()[0] if timeout else psutil.Process(procs[1].pid)
    assert len(rank1.children()) >= 2, "rank 1 has not its 2 DataLoader workers"
    if timeout:
        for p in procs:
            p.send_signal(signal.SIGALRM)
    else:
        os.killpg(procs[0].pid, signal.SIGTERM)
    rcs, out = _finish_ranks(workdir, tag, procs)
    assert rcs == [99, 99], out[-6000:]
    return _assert_checkpointed(run_dir, out, after)


def _finish_launcher(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) once the launcher and every process under it have ended (the ranks keep the output
    pipe open until they exit); on a timeout or an error the whole tree is killed: pipeline.launch runs DeepSpeed's
    launcher in a process group of its own, which a kill of the test's group would not reach."""
    tree = psutil.Process(p.pid).children(recursive=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the launcher run did not end in {timeout}s") from None
    finally:
        if p.poll() is None:
            for q in [psutil.Process(p.pid), *tree]:
                try:
                    q.kill()
                except psutil.Error:
                    pass
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [a.cmdline() for a in alive]
    return p.returncode, out


def _signalled_launcher(workdir: Path, cfg: Path, name: str, after: int, send, launcher=None) -> tuple[int, int]:
    """Starts a launcher run, calls send(proc) once it has logged a step past `after`; (exit code, checkpoint)."""
    p = _start_launcher(workdir, cfg, launcher) if launcher else _start_launcher(workdir, cfg)
    try:
        wait_for_step(workdir / name, after + 1, p)
    except AssertionError:
        _finish_launcher(p, timeout=0.1)
        raise
    send(p)
    rc, out = _finish_launcher(p)
    return rc, _assert_checkpointed(workdir / name, out, after)


def test_every_delivery_path_checkpoints_exits_99_and_resumes_exactly(workdir, reference):
    name = "chain"
    cfg = _config(workdir, name, STEPS)
    step = _job_stopped(workdir, cfg, name, 0, timeout=False)  # kill -TERM -- -PGID of a job's ranks
    step = _job_stopped(workdir, cfg, name, step, timeout=True)  # timeout per rank
    # The plain `deepspeed` command dies of SIGTERM at once (143: DeepSpeed's runner has no handler on one node);
    # its ranks notice the end of their launcher and stop with a checkpoint all the same.
    deepspeed = [str(Path(PY).parent / "deepspeed")]
    term = signal.SIGTERM
    rc, step = _signalled_launcher(workdir, cfg, name, step, lambda p: p.send_signal(term), launcher=deepspeed)
    assert rc == -term  # a shell shows 143
    # pipeline.launch: kill -TERM <launcher>, kill -TERM -- -<its PGID>. (`timeout` sends SIGTERM to both, the
    # launcher and its group: tests/test_launch.py, with stand-in ranks.)
    rc, step = _signalled_launcher(workdir, cfg, name, step, lambda p: p.send_signal(term))
    assert rc == 99
    rc, step = _signalled_launcher(workdir, cfg, name, step, lambda p: os.killpg(p.pid, term))
    assert rc == 99
    # The last run finishes; each run resumed the previous one's checkpoint, and the curve is the uninterrupted one.
    rc, out = _finish_launcher(_start_launcher(workdir, _config(workdir, name, TOTAL), slow=False))
    assert rc == 0 and f"resumed at step {step} " in out, out[-6000:]
    assert losses(workdir / name) == reference
