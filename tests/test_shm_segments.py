"""DeepSpeed's CPU shared-memory comm op (deepspeed_shm_comm) creates one 66 MB POSIX shm segment per rank,
/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, whenever every rank of the job is on one host
(LOCAL_SIZE == WORLD_SIZE: the `deepspeed` launcher on one node), and never unlinks it (its shared_close is never
called). Each 2-rank CPU run left 132 MB of RAM behind in /dev/shm; 162 of them had piled up to 11 GB on the
development machine, a third of a 24 GiB CI box. init_distributed unlinks each rank's name once every rank has
mapped every segment, so the memory goes with the last process, however it ends (SIGKILL included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.training.dist import _free_port

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")

_RANK = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from pipeline.training.dist import init_distributed

ctx = init_distributed()
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)  # the group still works after the names are gone
Path(sys.argv[1], f"rank{ctx.rank}.json").write_text(json.dumps({"sum": t.item()}))
# A process that exits straight after its first collectives without this sometimes dies in gloo's teardown
# ("terminate called without an active exception", 1 in 15 here); train.py runs long enough that it never has.
dist.destroy_process_group()
"""


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_two_rank_cpu_job_leaves_no_shm_segment(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2")
        env.update(LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu")
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-c", textwrap.dedent(_RANK), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("the 2-rank init did not finish in 240 s") from None
    assert all(p.returncode == 0 for p in procs), logs
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["sum"] for r in (0, 1)] == [3.0, 3.0]
    left = sorted(p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert left == [], f"segments left in /dev/shm: {left}"
