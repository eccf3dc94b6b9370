"""slurm/*.sh without Slurm: the #SBATCH headers, and common.sh's launch / signal / requeue logic with fake `srun`
and `scontrol` on PATH and a stub trainer. Runs anywhere (no root), in seconds; tests/test_slurm_cluster.py does
the same against a real Slurm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
pytestmark = pytest.mark.slurm

# srun: start SLURM_NTASKS copies of the command with the per-task variables, forward USR1/TERM to them,
# exit with the highest task exit code (as srun does).
FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >> "$FAKE_SRUN_LOG"
    while [[ $1 == -* ]]; do shift; done
    pids=()
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
      pids+=($!)
    done
    trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
    rc=0
    for p in "${pids[@]}"; do
      while kill -0 "$p" 2>/dev/null; do wait "$p"; done
      wait "$p"; r=$?; ((r > rc)) && rc=$r
    done
    exit $rc
""")

FAKE_SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >> "$FAKE_LOG"
    case "$1 $2" in
      "show hostnames") echo node-a; echo node-b ;;
      "show job") echo "JobId=$SLURM_JOB_ID JobState=RUNNING Command=$FAKE_COMMAND" ;;
      "requeue $SLURM_JOB_ID") exit "${FAKE_REQUEUE_RC:-0}" ;;
      *) exit 1 ;;
    esac
""")

STUB = textwrap.dedent("""\
    import json, os, signal, sys, time
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: got.append(n))
    out = sys.argv[sys.argv.index("--output-dir") + 1]
    os.makedirs(out, exist_ok=True)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
            "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "HF_HUB_DISABLE_PROGRESS_BARS")
    with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}, f)
    deadline = time.time() + float(os.environ.get("STUB_SECONDS", "20"))
    while time.time() < deadline:
        if got:
            open(os.path.join(out, "signal%s" % os.environ["RANK"]), "w").write(str(got[0]))
            sys.exit(99)
        time.sleep(0.05)
    sys.exit(int(os.environ.get("STUB_EXIT", "0")))
""")


def test_sbatch_headers():
    for n in (1, 2):
        text = (SLURM / f"stage{n}.sh").read_text()
        header = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
        for want in (
            f"--job-name=pill-stage{n}",
            "--nodes=1",
            "--ntasks-per-node=8",
            "--gres=gpu:8",
            "--output=%x-%j.out",
            "--open-mode=append",
            "--requeue",
            "--signal=B:USR1@180",
        ):
            assert want in header, (n, want, header)
        assert any(h.startswith("--cpus-per-task=") for h in header) and any(h.startswith("--time=") for h in header)
        # sbatch stops reading #SBATCH at the first command: the header must come before any code.
        first_code = next(
            i for i, line in enumerate(text.splitlines()[1:], 1) if line.strip() and not line.startswith("#")
        )
        last_sbatch = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
        assert last_sbatch < first_code
        assert "source" in text and "common.sh" in text and f"pill_run_stage {n} " in text


def test_bash_syntax_and_shellcheck():
    scripts = sorted(SLURM.glob("*.sh"))
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    r = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


@pytest.fixture
def fake(tmp_path):
    """A repo copy with the stub trainer, fake srun/scontrol on PATH, and the batch-job environment."""
    repo = tmp_path / "repo"
    for d in ("pipeline", "configs", "ds_configs", "bin"):
        (repo / d).mkdir(parents=True)
    shutil.copytree(SLURM, repo / "slurm")
    (repo / "pipeline" / "train.py").write_text(STUB)
    (repo / "configs" / "stage2_scienceqa.yaml").write_text("name: stub\n")
    (repo / "ds_configs" / "zero2.json").write_text("{}\n")
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (repo / "bin" / name).write_text(text)
        (repo / "bin" / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PILL_", "MASTER_"))}
    env.update(
        PATH=f"{repo / 'bin'}:{env['PATH']}",
        FAKE_LOG=str(tmp_path / "scontrol.log"),
        FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
        FAKE_COMMAND=str(repo / "slurm" / "stage2.sh"),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NAME="pill-stage2",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_TASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="3",
        PILL_CPU="1",
        PILL_PYTHON=sys.executable,
    )
    return repo, env, tmp_path


def _start(fake, **env):
    repo, base, tmp = fake
    # The batch script is a copy in the spool dir: run it from elsewhere, as slurmd does.
    spool = tmp / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(repo / "slurm" / "stage2.sh", spool / "slurm_script")
    log = open(tmp / "job.out", "w")
    p = subprocess.Popen(
        ["bash", str(spool / "slurm_script")], cwd=spool, env=dict(base, **env), stdout=log, stderr=subprocess.STDOUT
    )
    p.log_path = tmp / "job.out"
    return p


def _run_dir(fake) -> Path:
    return fake[0] / "runs" / "pill-stage2-123456"


def _wait_started(fake, p, n=2, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all((_run_dir(fake) / f"rank{r}.json").is_file() for r in range(n)):
            time.sleep(0.2)
            return
        assert p.poll() is None, p.log_path.read_text()
        time.sleep(0.05)
    pytest.fail("stub tasks did not start:\n" + p.log_path.read_text())


def _requeues(fake) -> list[str]:
    log = fake[2] / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.is_file() else []


def test_env_contract_and_arguments(fake):
    p = _start(
        fake,
        STUB_SECONDS="0.3",
        PILL_SET="stages.0.max_steps=5 seed=3",
        PILL_SOCKET_IFNAME="ib0",
        MASTER_ADDR="stale-host",
        MASTER_PORT="1",
    )
    assert p.wait(30) == 0, p.log_path.read_text()
    for r in (0, 1):
        rec = json.loads((_run_dir(fake) / f"rank{r}.json").read_text())
        assert rec["env"] == {
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node-a",
            "MASTER_PORT": str(10000 + 123456 % 20000),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "3",
            "GLOO_SOCKET_IFNAME": "ib0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        assert rec["argv"] == [
            "--ds_config",
            "ds_configs/zero2.json",
            "--config",
            "configs/stage2_scienceqa.yaml",
            "--output-dir",
            "runs/pill-stage2-123456",
            "--set",
            "stages.0.max_steps=5",
            "--set",
            "seed=3",
        ]
    assert _requeues(fake) == []
    assert "training finished" in p.log_path.read_text()


def test_usr1_is_forwarded_and_the_job_requeued(fake):
    p = _start(fake)
    _wait_started(fake, p)
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does before the time limit
    assert p.wait(20) == 0, p.log_path.read_text()
    assert [(_run_dir(fake) / f"signal{r}").read_text() for r in (0, 1)] == ["10", "10"]
    assert _requeues(fake) == ["requeue 123456"]
    assert "requeueing job 123456" in p.log_path.read_text()


def test_term_checkpoints_but_does_not_requeue(fake):
    p = _start(fake)
    _wait_started(fake, p)
    p.send_signal(signal.SIGTERM)  # scancel / time limit / preemption: a cancelled job must stay cancelled
    assert p.wait(20) == 99, p.log_path.read_text()
    assert (_run_dir(fake) / "signal0").is_file()
    assert _requeues(fake) == []
    assert "not requeueing" in p.log_path.read_text()


def test_term_requeues_when_asked(fake):
    p = _start(fake, PILL_REQUEUE_ON_TERM="1")
    _wait_started(fake, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0, p.log_path.read_text()
    assert _requeues(fake) == ["requeue 123456"]


def test_exit_99_without_signal_requeues(fake):
    # e.g. --signal=USR1@N without B: signals the tasks directly; the batch shell only sees exit code 99.
    p = _start(fake, STUB_SECONDS="0.2", STUB_EXIT="99")
    assert p.wait(20) == 0, p.log_path.read_text()
    assert _requeues(fake) == ["requeue 123456"]


def test_requeue_limits_and_failures(fake):
    p = _start(fake, STUB_SECONDS="0.2", STUB_EXIT="99", SLURM_RESTART_COUNT="3", PILL_MAX_RESTARTS="3")
    assert p.wait(20) == 99 and _requeues(fake) == [], p.log_path.read_text()
    p = _start(fake, STUB_SECONDS="0.2", STUB_EXIT="99", FAKE_REQUEUE_RC="1")
    assert p.wait(20) == 99, p.log_path.read_text()
    assert "scontrol requeue failed" in p.log_path.read_text()
    p = _start(fake, STUB_SECONDS="0.2", STUB_EXIT="3")
    assert p.wait(20) == 3
    assert "training failed with exit code 3" in p.log_path.read_text()


def test_missing_config_is_a_clear_error(fake):
    p = _start(fake, PILL_CONFIG="configs/nope.yaml")
    assert p.wait(20) == 2
    assert "configs/nope.yaml not found" in p.log_path.read_text()


def test_demo_script_header():
    text = (SLURM / "demo.sh").read_text()
    header = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    # Runs on a CPU-only (e.g. the local) cluster as submitted: no GPU request, 2 CPU tasks.
    assert not any("gres" in h or "gpu" in h for h in header), header
    assert "--ntasks-per-node=2" in header and "--job-name=pill-demo" in header
    assert 'pill_run_stage "1 2" configs/demo.yaml' in text and "PILL_CPU=${PILL_CPU:-1}" in text


def test_srun_gets_cpus_per_task_and_kills_on_bad_exit(fake):
    p = _start(fake, STUB_SECONDS="0.2")
    assert p.wait(30) == 0, p.log_path.read_text()
    srun_args = (fake[2] / "srun.log").read_text().split()
    # Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch; a dead rank must end the step.
    assert "--cpus-per-task=3" in srun_args and "--kill-on-bad-exit=1" in srun_args, srun_args


def test_master_port_stays_below_the_ephemeral_range():
    for job_id in (0, 1, 22767, 22768, 40000, 49999, 123456, 2**31 - 1):
        r = subprocess.run(
            ["bash", "-c", f"source {SLURM / 'common.sh'}; SLURM_JOB_ID={job_id} pill_master_port"],
            capture_output=True,
            text=True,
        )
        port = int(r.stdout)
        assert 10000 <= port < 32768, (job_id, port)  # Linux ip_local_port_range starts at 32768


def test_pill_set_is_not_glob_expanded(fake):
    repo = fake[0]
    # A file whose name matches the pattern: an unquoted ${PILL_SET} would pass its name instead of the pattern.
    (repo / "stages.0.max_steps=20").write_text("")
    p = _start(fake, STUB_SECONDS="0.2", PILL_SET="  stages.*.max_steps=20 \t\n eval.enabled=false \n")
    assert p.wait(30) == 0, p.log_path.read_text()
    argv = json.loads((_run_dir(fake) / "rank0.json").read_text())["argv"]
    assert argv[-4:] == ["--set", "stages.*.max_steps=20", "--set", "eval.enabled=false"], argv


def test_log_names_the_stages_the_config_trains(fake):
    repo = fake[0]
    (repo / "configs" / "two.yaml").write_text("name: x\nstages:\n  - {stage: 1}\n  - stage: 2\n")
    p = _start(fake, STUB_SECONDS="0.2", PILL_CONFIG="configs/two.yaml")
    assert p.wait(30) == 0, p.log_path.read_text()
    log = p.log_path.read_text()
    assert "trains stage(s) 1 2, not only stage 2" in log and "stage(s) 1 2 restart 0" in log, log
    p = _start(fake, STUB_SECONDS="0.2")  # the stub config has no stages list: the script's stage is shown
    assert p.wait(30) == 0 and "stage(s) 2 restart 0" in p.log_path.read_text()


_METRICS_CHILD = textwrap.dedent("""
    import sys
    from pipeline.training.metrics import MetricsLogger
    log = MetricsLogger(sys.argv[1], enabled=True, tensorboard=False, progress_bar=True, total_steps=50)
    print("bar" if log.bar is not None else "no bar", flush=True)
    for step in range(1, 51):
        log.progress(step, 1.0 / step, 1e-3, 10.0)
        if step % 10 == 0:
            log.log(step, {"loss": 1.0 / step, "lr": 1e-3})
    log.close()
""")


def test_no_progress_bar_in_log_files(tmp_path):
    """Slurm's %x-%j.out is a file: no tqdm carriage returns there, only whole log lines."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        r = subprocess.run(
            [sys.executable, "-c", _METRICS_CHILD, str(tmp_path / "run")], stdout=o, stderr=e, cwd=REPO, timeout=120
        )
    text = out.read_text() + err.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and text.splitlines()[0] == "no bar", text
    assert [line.split("] ", 1)[1].split(" |")[0] for line in out.read_text().splitlines()[1:]] == [
        f"step {n}" for n in (10, 20, 30, 40, 50)
    ]


def test_progress_bar_on_a_terminal(tmp_path):
    import pty

    master, slave = pty.openpty()
    try:
        r = subprocess.run(
            [sys.executable, "-c", _METRICS_CHILD, str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 0 and r.stdout.decode().splitlines()[0] == "bar"
