"""DeepSpeed's CPU shared-memory comm op (deepspeed_shm_comm) creates one 66 MB POSIX shm segment per rank,
/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, whenever every rank of the job is on one host
(LOCAL_SIZE == WORLD_SIZE: the `deepspeed` launcher on one node), and never unlinks it (its shared_close is never
called). Each 2-rank CPU run left 132 MB of RAM behind in /dev/shm; 162 of them had piled up to 11 GB on the
development machine, a third of a 24 GiB CI box. init_distributed unlinks each rank's name once every rank has
mapped every segment, so the memory goes with the last process, however it ends (SIGKILL included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import run_cpu_ranks

SHM = Path("/dev/shm")

_RANK = """
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from pipeline.training.dist import init_distributed

ctx = init_distributed()
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)  # the group still works after the names are gone
Path(sys.argv[1], f"rank{ctx.rank}.json").write_text(json.dumps({"sum": t.item(), "port": os.environ["MASTER_PORT"]}))
# A process that exits straight after its first collectives without this sometimes dies in gloo's teardown
# ("terminate called without an active exception", 1 in 15 here); train.py runs long enough that it never has.
dist.destroy_process_group()
"""


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_two_rank_cpu_job_leaves_no_shm_segment(tmp_path):
    codes, logs = run_cpu_ranks(_RANK, tmp_path, timeout=240, LOCAL_SIZE="2")  # LOCAL_SIZE: as `deepspeed` sets it
    assert codes == [0, 0], logs
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["sum"] for g in got] == [3.0, 3.0]
    port = got[0]["port"]
    left = sorted(p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert left == [], f"segments left in /dev/shm: {left}"
