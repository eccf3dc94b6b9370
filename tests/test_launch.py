"""pipeline.launch with stand-in ranks (seconds, no model) under `timeout`: the stop signal, sent to the launcher
and its process group while the ranks are still starting, reaches no rank directly (DeepSpeed's launcher runs in a
group of its own); it is held until each rank has installed its handler, then delivered once; the ranks' exit code
comes back through launch.py, the runner, pipeline.launch and timeout.

The real trainer under `kill` and `kill -- -PGID` of pipeline.launch is tests/test_reliability_preempt.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# A rank that takes a while to install its handler (as pipeline/train.py's imports would, were its handler not the
# first thing it installs), then waits for SIGTERM: records it, exits 99 (the launcher's log counts deliveries).
RANK = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[-1]
    rank = os.environ["RANK"]
    open(os.path.join(out, "started" + rank), "w").close()
    time.sleep(2.0)
    got = []
    signal.signal(signal.SIGTERM, lambda n, f: got.append(n))
    for _ in range(600):
        if got:
            open(os.path.join(out, "got" + rank), "w").write(str(got[0]))
            sys.exit(99)
        time.sleep(0.05)
    sys.exit(5)
""")


def test_timeout_during_start_up_is_held_delivered_once_and_99_returned(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    timeout = ["timeout", "--preserve-status", "-s", "TERM", "600"]
    cmd = [*timeout, sys.executable, "-m", "pipeline.launch", "--num_gpus", "2", "--master_port", str(free_port())]
    p = subprocess.Popen(
        [*cmd, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        t0 = time.time()
        while not all((tmp_path / f"started{r}").is_file() for r in (0, 1)):
            assert p.poll() is None and time.time() - t0 < 120, p.stdout.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        # SIGALRM is timeout's timer running out: SIGTERM to pipeline.launch, then to timeout's process group.
        p.send_signal(signal.SIGALRM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            for q in psutil.Process(p.pid).children(recursive=True):
                q.kill()
            p.kill()
    assert p.returncode == 99, out[-4000:]
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2, out[-4000:]
    assert out.count("pipeline.launch: SIGTERM -> rank") == 2, out[-4000:]
