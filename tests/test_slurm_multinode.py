"""Two "nodes" without Slurm: two network namespaces joined by a veth pair, one training process in each.

Each process is started exactly as srun starts a task of slurm/stage*.sh: through slurm/task.sh with the Slurm
per-task variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and MASTER_ADDR/MASTER_PORT, on CPU with gloo
(DS_ACCELERATOR=cpu). Rank 1 lives in its own namespace, so it can reach rank 0 only over the veth (10.77.0.1),
as on a real second node. A small driver wraps pipeline.train.main to record what the trainer does not write
itself: the shards each rank's loader opened (pipeline.data's `shards_read`) and each rank's view of the
logged metrics. Needs root and `ip netns`; skipped otherwise. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
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

STEPS = 4
TIMEOUT_S = 170

# Runs pipeline.train.main(argv) unchanged; only observes. Rank > 0 gets its own metrics.jsonl under
# <run dir>/rank<N>/ (the trainer writes metrics on global rank 0 only) so the test can compare what ranks saw.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, os.environ["PILL_REPO"])
    import pipeline.training.data_glue as data_glue  # where the trainer looks build_loader up
    import pipeline.training.loop as loop

    rank = int(os.environ["RANK"])
    loaders = []
    _build = data_glue.build_loader

    def build_loader(*a, **k):
        loaders.append(_build(*a, **k))
        return loaders[-1]

    data_glue.build_loader = build_loader
    _Logger = loop.MetricsLogger

    class RankLogger(_Logger):
        def __init__(self, run_dir, enabled, *a, **k):
            if rank:
                run_dir, enabled = Path(run_dir) / f"rank{rank}", True
            super().__init__(run_dir, enabled, *a, **k)

    loop.MetricsLogger = RankLogger
    from pipeline.train import main

    rc = main(sys.argv[1:])
    out = Path(os.environ["PILL_TEST_OUT"]) / f"shards_rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "shards_read": [list(ld.shards_read) for ld in loaders]}))
    sys.exit(rc)
""")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def two_nodes():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    tag = f"{os.getpid() % 100000}"
    ns = [f"pill-a{tag}", f"pill-b{tag}"]
    veth = [f"pva{tag}", f"pvb{tag}"]  # interface names must stay under 16 characters
    created = []
    try:
        for n in ns:
            r = _ip("netns", "add", n, check=False)
            if r.returncode:
                pytest.skip(f"'ip netns add' failed here: {r.stderr.strip()}")
            created.append(n)
        r = _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1], check=False)
        if r.returncode:
            pytest.skip(f"cannot create a veth pair: {r.stderr.strip()}")
        r = subprocess.run(["ip", "netns", "exec", ns[0], "true"], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"'ip netns exec' does not work here: {r.stderr.strip()}")
        for n, v, addr in zip(ns, veth, ("10.77.0.1/24", "10.77.0.2/24")):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", addr, "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        yield ns, veth
    finally:
        for n in created:  # deleting a namespace also deletes the veth end inside it (and so the pair)
            _ip("netns", "del", n, check=False)


def test_two_namespaces_train_together(two_nodes, tmp_path):
    ns, veth = two_nodes
    cfg = tiny_stage2_config(tmp_path / "tiny.yaml", STEPS)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        str(driver),
        "--ds_config",
        str(REPO / "ds_configs" / "zero2.json"),
        "--config",
        str(cfg),
        "--output-dir",
        str(run_dir),
    ]
    procs, logs = [], []
    t0 = time.time()
    for rank in (0, 1):
        env = dict(
            os.environ,
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID="0",
            SLURM_NODEID=str(rank),
            SLURM_TASKS_PER_NODE="1(x2)",
            MASTER_ADDR="10.77.0.1",
            MASTER_PORT="29577",
            DS_ACCELERATOR="cpu",
            GLOO_SOCKET_IFNAME=veth[rank],
            OMP_NUM_THREADS="1",
            PILL_REPO=str(REPO),
            PILL_TEST_OUT=str(tmp_path),
            PYTHONUNBUFFERED="1",
        )
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # slurm/task.sh must derive these
            env.pop(k, None)
        log = open(tmp_path / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns[rank], "bash", str(REPO / "slurm" / "task.sh"), *argv],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=max(1.0, TIMEOUT_S - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], f"training failed or timed out ({TIMEOUT_S}s):\n{tails}"
    print(f"two-namespace run: {time.time() - t0:.1f}s")

    # Same loss on both ranks at every step: the per-step all-reduce went over the veth.
    rows = [
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in (run_dir / "metrics.jsonl", run_dir / "rank1" / "metrics.jsonl")
    ]
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1)), tails
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]
    for a, b in zip(*rows):
        assert a["loss"] == b["loss"], (a, b)
    # Each rank read its own shards: both non-empty, no shard read by both ranks.
    shards = [json.loads((tmp_path / f"shards_rank{r}.json").read_text())["shards_read"] for r in (0, 1)]
    sets = [{s for per_loader in sh for s in per_loader} for sh in shards]
    assert sets[0] and sets[1], shards
    assert not sets[0] & sets[1], f"shards read by both ranks: {sorted(sets[0] & sets[1])}"
    # The run finished like a normal one: final checkpoint and the export of the trainable weights.
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()
