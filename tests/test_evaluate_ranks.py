"""The end-of-run evaluation in a 2-rank job: rank 0 evaluates, and its failure must reach the other ranks."""

from __future__ import annotations

import json
import os

from tests.helpers import run_cpu_ranks

# Rank 0 stays up after its error (as a rank does whose peers are not told of its death: NCCL, or a launcher that
# does not kill the job), so a rank left at a barrier waits until rank 0 gives up: the subprocess timeout bounds it.
_RANK = """
import json, os, sys, time
from pathlib import Path
from pipeline.training.config import load_config
from pipeline.training.dist import init_distributed
from pipeline.training.evaluate import evaluate_export

out = Path(sys.argv[1])
cfg = load_config("configs/demo.yaml", [f"output_dir={out}", "precision=fp32"])
ctx = init_distributed()
try:
    evaluate_export(cfg, out / "no_export", ctx, "tiny", "tiny")
    got = {"error": None}
except Exception as e:
    got = {"error": f"{type(e).__name__}: {e}"}
(out / f"rank{ctx.rank}.json").write_text(json.dumps(got))
for _ in range(200 if ctx.rank == 0 else 0):
    if (out / "rank1.json").exists():
        break
    time.sleep(0.1)
"""


def test_an_evaluation_error_on_rank_0_reaches_every_rank(tmp_path):
    codes, logs = run_cpu_ranks(_RANK, tmp_path, timeout=90)
    files = {r: tmp_path / f"rank{r}.json" for r in (0, 1)}
    got = {r: json.loads(f.read_text()) for r, f in files.items() if f.is_file()}
    assert set(got) == {0, 1}, logs
    # Rank 0 raises its own error (the missing export, named); rank 1 learns that rank 0's evaluation failed.
    assert got[0]["error"].startswith("FileNotFoundError") and "no_export" in got[0]["error"], got
    assert got[1]["error"] and "rank 0" in got[1]["error"] and "evaluation" in got[1]["error"], (got, logs[1])
    assert codes == [0, 0], logs


def test_rank_0_evaluates_on_the_cores_the_waiting_ranks_leave(monkeypatch, tmp_path):
    """The other ranks only wait while rank 0 evaluates: on a 2-core CPU host with 2 ranks (1 thread each for
    training), rank 0 takes both cores for the evaluation (demo_smollm2: 324 s -> 210 s) and gives the second back
    after; a user's OMP_NUM_THREADS is left alone."""
    import torch

    from pipeline.training import evaluate
    from pipeline.training.config import load_config
    from pipeline.training.dist import DistContext

    seen = []
    monkeypatch.setattr(evaluate, "_evaluate", lambda *a: seen.append(torch.get_num_threads()) or {})
    cfg = load_config("configs/demo.yaml", [f"output_dir={tmp_path}"])
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(1)
    try:
        evaluate.evaluate_export(cfg, tmp_path, ctx, "tiny", "tiny")
        after = torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        evaluate.evaluate_export(cfg, tmp_path, ctx, "tiny", "tiny")
    finally:
        torch.set_num_threads(before)
    assert seen == [min(2, os.cpu_count() or 1), 1] and after == 1
