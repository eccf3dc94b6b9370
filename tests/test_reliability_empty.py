"""No stage trains on nothing (issue 28, item 1): a stage whose first batches hold no usable sample stops before
any optimizer step, exit 2, naming the source, the skip reasons and what to change; no checkpoint, no export."""

from __future__ import annotations

import re

import pytest

from tests.reliability import build_workdir, run, train_cmd, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return build_workdir(tmp_path_factory.mktemp("rel_empty"))


def test_stage_with_no_usable_sample_stops_before_any_step(workdir):
    # The demo shards are ScienceQA samples: as `chat` every one lacks its conversation and is skipped.
    cfg = write_config(workdir, "empty", **{"stages.0.task": "chat", "stages.0.max_steps": 3})
    p = run(train_cmd(cfg), workdir)
    assert p.returncode == 2, p.stdout[-4000:]
    err = [line for line in p.stdout.splitlines() if line.startswith("config error:")]
    assert err, p.stdout[-4000:]
    msg = err[-1]
    assert "stages[0]" in msg and "task chat" in msg and "train-index.json" in msg, msg
    assert "missing_field" in msg or "bad_conversation" in msg, msg
    assert "stages[0].task" in msg, msg  # what to change
    # the stage header names the backends the steps would run (it said "backends None" before the first forward)
    assert re.search(r"backends \w+/\w+", p.stdout) and "backends None" not in p.stdout, p.stdout[-4000:]
    run_dir = workdir / "empty"
    assert not (run_dir / "export").exists()
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip()
