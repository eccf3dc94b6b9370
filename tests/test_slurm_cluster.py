"""slurm/stage2.sh on a real one-node Slurm (slurm/local_cluster.sh): a run to completion, and a preemption.

The cluster comes up once for the module (its own state dir and ports) and goes down at the end. Jobs run the
tiny demo model on CPU (PILL_CPU=1, gloo) as 2 tasks, which is what the 2-core CI machine holds.

  1. a stub train.py checks the script plumbing in seconds: the per-task env contract, PILL_SET, and that a
     plain `scancel` (SIGTERM) makes the tasks checkpoint but is not turned into a requeue;
  2. the real trainer runs to completion: job log, metrics.jsonl, checkpoint, export;
  3. the real trainer is stopped twice mid-run, rank 0 without DataLoader workers and rank 1 with 2: first by
     `scancel --signal=TERM` (SIGTERM to every process of the tasks, the workers included), then, once requeued,
     by SIGUSR1 the way `--signal=B:USR1@N` delivers it (`scancel --signal=USR1 --batch`, the batch shell
     forwards it): each time the tasks checkpoint and exit 99, the script requeues the job, the requeued job
     resumes from the checkpoint in the same run dir; it finishes with the loss curve of the run of 2. that was
     never interrupted (same config and ranks), each step once in metrics.jsonl.

Needs root and either Slurm + munge installed or apt-get to install them; skipped otherwise. ~4 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import tiny_stage2_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
CPU_JOB = ["--gres=none", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        # Own ports (pid-derived), so a cluster started by hand (6817) or another test run does not collide.
        port = 17000 + 2 * (os.getpid() % 4000)
        self.env = dict(
            os.environ, PILL_SLURM_STATE=str(state), PILL_SLURM_PORT=str(port), SLURM_CONF=str(state / "slurm.conf")
        )
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            self.env.pop(k, None)

    def script(self, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(REPO / "slurm" / "local_cluster.sh"), cmd],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def run(self, *args: str, **env: str) -> str:
        r = subprocess.run(list(args), env=dict(self.env, **env), text=True, capture_output=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
        return r.stdout

    def sbatch(self, script: Path, *flags: str, **env: str) -> str:
        return self.run("sbatch", "--parsable", *flags, str(script), **env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job reaches a final state (or `until(job)` is true); fail with the log on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if until(j) if until else j["JobState"] in FINAL:
                return j
            time.sleep(1)
        j = self.job(job_id)
        log = Path(j.get("StdOut", "")).read_text()[-4000:] if Path(j.get("StdOut", "")).is_file() else "(no log)"
        pytest.fail(f"job {job_id} still {j['JobState']} after {timeout:.0f}s; log tail:\n{log}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: starts munged, slurmctld and slurmd")
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and shutil.which("apt-get") is None:
        pytest.skip("Slurm/munge are not installed and there is no apt-get to install them")
    c = Cluster(tmp_path_factory.mktemp("slurm-state"))
    t0 = time.time()
    try:
        r = c.script("up")
    except subprocess.TimeoutExpired:
        c.script("down")
        if not have:
            pytest.skip("installing slurm-wlm/munge with apt-get took over 300 s (no package mirror?)")
        raise
    if r.returncode and not have and "apt-get install" in r.stderr:
        pytest.skip(f"could not install slurm-wlm/munge with apt-get: {r.stderr.strip()[-500:]}")
    assert r.returncode == 0, f"local_cluster.sh up failed:\n{r.stdout}\n{r.stderr}"
    assert c.script("up").returncode == 0, "a second `up` must be a no-op"
    print(f"cluster up in {time.time() - t0:.1f}s")
    try:
        yield c
    finally:
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], env=c.env, capture_output=True)
        r = c.script("down")
        assert r.returncode == 0, r.stderr
        for name in ("slurmctld", "slurmd"):
            pidfile = c.state / "run" / f"{name}.pid"
            if pidfile.is_file():
                pid = int(pidfile.read_text())
                assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), (
                    f"{name} (pid {pid}) still running after down"
                )


# ---- 1. the script plumbing, with a stub trainer -----------------------------------------------------------------

STUB = textwrap.dedent('''
    """Stands in for pipeline/train.py: records its env and args, checkpoints and exits 99 on SIGTERM/SIGUSR1."""
    import argparse, json, os, signal, sys, time
    flag = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: flag.append(n))
    p = argparse.ArgumentParser()
    for a in ("--ds_config", "--config", "--output-dir"):
        p.add_argument(a)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    os.makedirs(a.output_dir, exist_ok=True)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "SLURM_JOB_ID")
    rec = {"env": {k: os.environ.get(k) for k in keys}, "set": a.set, "config": a.config, "ds": a.ds_config}
    with open(os.path.join(a.output_dir, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(rec, f)
    for _ in range(600):
        if flag:
            open(os.path.join(a.output_dir, "ckpt%s" % os.environ["RANK"]), "w").write(str(flag[0]))
            sys.exit(99)
        time.sleep(0.1)
''')


def _fake_repo(tmp_path: Path, stub: str) -> Path:
    fake = tmp_path / "repo"
    (fake / "pipeline").mkdir(parents=True)
    (fake / "configs").mkdir()
    (fake / "ds_configs").mkdir()
    shutil.copytree(REPO / "slurm", fake / "slurm")
    (fake / "pipeline" / "train.py").write_text(stub)
    (fake / "configs" / "stage2_scienceqa.yaml").write_text("name: stub\n")
    (fake / "ds_configs" / "zero2.json").write_text("{}\n")
    return fake


def test_script_env_contract_and_scancel_is_not_requeued(cluster, tmp_path):
    fake = _fake_repo(tmp_path, STUB)
    run_dir = tmp_path / "run"
    # --chdir=/: the script must find its repo from the submitted path, not from the working directory.
    job = cluster.sbatch(
        fake / "slurm" / "stage2.sh",
        *CPU_JOB,
        f"--output={tmp_path}/%x-%j.out",
        "--chdir=/",
        PILL_CPU="1",
        PILL_RUN_DIR=str(run_dir),
        PILL_PYTHON=sys.executable,
        PILL_SET="stages.0.max_steps=7 log.every_steps=3",
    )
    cluster.wait(job, 60, until=lambda j: (run_dir / "rank1.json").is_file() or j["JobState"] in FINAL)
    time.sleep(0.5)
    cluster.run("scancel", job)  # SIGTERM everywhere, as a user's cancel
    j = cluster.wait(job, 60)
    log = Path(j["StdOut"]).read_text()
    assert j["JobState"] == "CANCELLED" and j["Restarts"] == "0", (j, log)
    assert "not requeueing" in log, log
    # Both tasks stopped through their handler (SIGTERM from slurmstepd or SIGUSR1 forwarded by the script).
    assert {(run_dir / f"ckpt{r}").read_text() for r in (0, 1)} <= {"10", "15"}
    port = str(10000 + int(job) % 20000)
    for r in (0, 1):
        rec = json.loads((run_dir / f"rank{r}.json").read_text())
        assert rec["env"] == {
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": os.uname()[1],
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "SLURM_JOB_ID": job,
        }, rec
        assert rec["set"] == ["stages.0.max_steps=7", "log.every_steps=3"]
        assert rec["config"] == "configs/stage2_scienceqa.yaml" and rec["ds"] == "ds_configs/zero2.json"


# A rank that dies while the other waits (in a collective, in the real trainer): rank 1 exits 3 at once, rank 0
# would sleep 60 s; it leaves on the SIGTERM that ends the step (a blocked NCCL rank would be SIGKILLed after
# KillWait), recording when it got it.
DYING_STUB = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[sys.argv.index("--output-dir") + 1]
    os.makedirs(out, exist_ok=True)
    def on_term(n, f):
        open(os.path.join(out, "term%s" % os.environ["RANK"]), "w").write(str(time.time()))
        sys.exit(1)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(out, "start%s" % os.environ["RANK"]), "w").write(str(time.time()))
    if os.environ["RANK"] == "1":
        time.sleep(2)
        sys.exit(3)
    time.sleep(60)
""")


def test_a_dead_rank_ends_the_step_at_once(cluster, tmp_path):
    fake = _fake_repo(tmp_path, DYING_STUB)
    run_dir = tmp_path / "run"
    t0 = time.time()
    job = cluster.sbatch(
        fake / "slurm" / "stage2.sh",
        *CPU_JOB,
        f"--output={tmp_path}/%x-%j.out",
        PILL_CPU="1",
        PILL_RUN_DIR=str(run_dir),
        PILL_PYTHON=sys.executable,
    )
    j = cluster.wait(job, 90)
    log = Path(j["StdOut"]).read_text()
    assert j["JobState"] == "FAILED" and j["Restarts"] == "0", (j, log)
    assert "training failed" in log and "requeueing" not in log, log
    assert (run_dir / "term0").is_file(), log  # rank 0 was ended by Slurm, not by its 60 s running out
    assert float((run_dir / "term0").read_text()) - float((run_dir / "start0").read_text()) < 20, log
    print(f"dead-rank job {job}: {time.time() - t0:.1f}s")


# ---- 2-3. the real trainer ---------------------------------------------------------------------------------------


def _hooked_python(tmp_path: Path, hooks: dict[str, str]) -> Path:
    """A PILL_PYTHON for slurm/common.sh that starts pipeline/train.py through tests/train_hooks.py with the
    PILL_TEST_* `hooks` set (the trainer itself has no test hooks); any other call is the plain interpreter."""
    shim = tmp_path / "python"
    exports = "".join(f"export {k}={v}\n" for k, v in hooks.items())
    shim.write_text(
        f"#!/bin/sh\n{exports}"
        f'if [ "$1" = pipeline/train.py ]; then shift; exec {sys.executable} {REPO}/tests/train_hooks.py "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    shim.chmod(0o755)
    return shim


def _submit_real(
    cluster: Cluster, tmp_path: Path, steps: int, extra_set: str = "", hooks: dict[str, str] | None = None
) -> tuple[str, Path]:
    cfg = tiny_stage2_config(tmp_path / "tiny.yaml", steps)
    run_dir = tmp_path / "run"
    python = {"PILL_PYTHON": str(_hooked_python(tmp_path, hooks))} if hooks else {}
    job = cluster.sbatch(
        REPO / "slurm" / "stage2.sh",
        *CPU_JOB,
        "--job-name=pill-test",
        f"--output={tmp_path}/%x-%j.out",
        PILL_CPU="1",
        PILL_CONFIG=str(cfg),
        PILL_RUN_DIR=str(run_dir),
        PILL_SET=extra_set,
        **python,
    )
    return job, run_dir


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


STEPS = 10
# Rank 0 reads its data in the main process, rank 1 through 2 DataLoader workers (tests/train_hooks.py): a signal to
# every process of the tasks reaches both kinds.
WORKERS = {"PILL_TEST_WORKERS_BY_RANK": "0,2"}


@pytest.fixture(scope="module")
def completed(cluster, tmp_path_factory) -> tuple[dict[str, str], str, Path]:
    """stage2.sh run to the end, never interrupted: (its job record, its log, its run dir)."""
    tmp_path = tmp_path_factory.mktemp("stage2")
    t0 = time.time()
    job, run_dir = _submit_real(cluster, tmp_path, steps=STEPS, hooks=WORKERS)
    j = cluster.wait(job, 150)
    print(f"stage2 job {job}: {time.time() - t0:.1f}s")
    return j, Path(j["StdOut"]).read_text(), run_dir


def test_stage2_runs_to_completion(completed):
    j, log, run_dir = completed
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, log[-4000:])
    assert "2 tasks on 1 node(s)" in log and "CPU/gloo" in log and "training finished" in log, log[-4000:]
    assert "world 2" in (run_dir / "train.log").read_text()
    assert _metric_steps(run_dir) == list(range(1, STEPS + 1))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir()
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()


def test_demo_script_as_a_new_user_submits_it(cluster, tmp_path):
    """README's first job: `sbatch slurm/demo.sh` with no flags (2 CPU tasks, both demo stages), a short run."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(
        REPO / "slurm" / "demo.sh",
        f"--output={tmp_path}/%x-%j.out",
        PILL_RUN_DIR=str(run_dir),
        PILL_SET="stages.*.max_steps=3 eval.enabled=false",
    )
    j = cluster.wait(job, 150)
    log = Path(j["StdOut"]).read_text()
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, log[-4000:])
    assert "stage(s) 1 2 restart 0: 2 tasks" in log and "training finished" in log, log[-4000:]
    assert "\r" not in log, "a progress bar went into the job log"
    for stage in ("stage1", "stage2"):
        assert (run_dir / stage / "export" / "adapter_model.safetensors").is_file(), sorted(run_dir.rglob("*"))[:20]


def _stop_and_requeue(cluster: Cluster, job: str, run_dir: Path, restarts: int, after: int, *scancel: str) -> int:
    """Once the job's run `restarts` has logged a step past `after`, `scancel *scancel job`; waits for the requeued
    job to start again and returns the step the stopped run checkpointed."""
    cluster.wait(
        job,
        150,
        until=lambda j: (int(j["Restarts"]) == restarts and max(_metric_steps(run_dir) or [0]) > after)
        or j["JobState"] in FINAL,
    )
    assert cluster.job(job)["JobState"] == "RUNNING", "finished before it could be signalled"
    cluster.run("scancel", *scancel, job)
    cluster.wait(job, 150, until=lambda j: int(j["Restarts"]) > restarts or j["JobState"] in FINAL - {"PREEMPTED"})
    found = re.findall(r"signal \d+: checkpoint \S+ written at step (\d+)", (run_dir / "train.log").read_text())
    assert len(found) == restarts + 1, (run_dir / "train.log").read_text()[-3000:]
    return int(found[-1])


def test_signal_checkpoints_requeues_and_resumes(cluster, completed, tmp_path):
    t0 = time.time()
    # A second per step (tests/train_hooks.py) keeps the run going long enough to be signalled mid-way.
    hooks = {"PILL_TEST_SLEEP_PER_STEP": "1.0", **WORKERS}
    job, run_dir = _submit_real(cluster, tmp_path, steps=STEPS, hooks=hooks)
    # scancel --signal=TERM: SIGTERM to every process of the job's steps (ranks and DataLoader workers), not to the
    # batch shell; the tasks exit 99, which the script answers with a requeue.
    ck1 = _stop_and_requeue(cluster, job, run_dir, 0, 2, "--signal=TERM")
    # What --signal=B:USR1@N delivers before the time limit: SIGUSR1 to the batch shell only.
    ck2 = _stop_and_requeue(cluster, job, run_dir, 1, ck1 + 1, "--signal=USR1", "--batch")
    j = cluster.wait(job, 200, until=lambda j: j["JobState"] in FINAL and j["JobState"] != "PREEMPTED")
    log = Path(j["StdOut"]).read_text()
    print(f"preempt/requeue/resume x2 job {job}: {time.time() - t0:.1f}s")
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, log[-4000:])
    assert int(j["Restarts"]) == 2, j
    assert log.count("requeueing job") == 2 and "got SIGUSR1" in log and "restart 2" in log, log[-4000:]
    assert "got SIGTERM" not in log, log[-4000:]  # scancel --signal=TERM went to the tasks, not the batch shell
    train_log = (run_dir / "train.log").read_text()
    assert "killed by signal" not in train_log, train_log[-3000:]
    assert 1 <= ck1 < ck2 < STEPS, (ck1, ck2)
    for ck in (ck1, ck2):
        assert re.search(rf"resumed at step {ck} from ", train_log), train_log[-3000:]
    # One loss curve: every step once, the resumed runs continuing right after each checkpointed step, exactly as
    # the run that was never stopped.
    assert _metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert _losses(run_dir) == _losses(completed[2])
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()
