"""Helpers shared by several test files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipeline.model.batch import Batch
from pipeline.training.dist import _free_port
from pipeline.training.loss import answer_loss

REPO = Path(__file__).resolve().parents[1]


def tiny_stage2_config(path: Path, steps: int, **stage_overrides) -> Path:
    """The smallest run of the repo's demo preset: its stage 2 alone, a few steps, no eval, no progress bar."""
    d = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    st = dict(d["stages"][-1], max_steps=steps, micro_batch_size=2, **stage_overrides)
    st.pop("eval_shards", None)
    d["stages"] = [st]
    d["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    d["log"] = {"every_steps": 1, "progress_bar": False, "tensorboard": False}
    d["eval"] = {"enabled": False}
    path.write_text(yaml.safe_dump(d))
    return path


def logits_of(model, **fields):
    """(B, T, V) logits of a method's forward on Batch(**fields) (tests' shorthand for the contract's two calls)."""
    return model.output_logits(model(Batch(**fields)))


def loss_of(model, **fields):
    """The trainer's answer loss of Batch(**fields) on its own: the mean over its answer tokens."""
    return answer_loss(model, Batch(**fields))


def run_cpu_ranks(script: str, arg: Path, timeout: float, world: int = 2, **env: str) -> tuple[list[int], list[str]]:
    """Run `script` (python -c, in the repo) as `world` CPU ranks of one gloo job, with the variables a launcher
    sets (plus `env`), `arg` as its argument. Returns the exit codes and the last 3000 characters of each rank's
    output; a rank still running after `timeout` s fails the test with every rank's output."""
    port, procs = str(_free_port()), []
    for rank in range(world):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=port)
        rank_env.update(LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        rank_env.update(env)
        cmd = [sys.executable, "-c", textwrap.dedent(script), str(arg)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=timeout)[0].decode()[-3000:] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0].decode()[-3000:] for p in procs]
        raise AssertionError(f"a rank did not finish within {timeout} s: {logs}") from None
    return [p.returncode for p in procs], logs
