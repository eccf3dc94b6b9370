"""Checkpoints that fall back (issue 28, item 4): a damaged newest checkpoint (truncated, deleted or corrupted
file, a `latest` that points nowhere) is reported by file name and the run resumes from the newest complete one;
pruning never removes the newest complete checkpoint; no message advises deleting a complete one."""

from __future__ import annotations

import shutil

import pytest

from pipeline.training.checkpoint import CheckpointManager
from pipeline.training.config import ConfigError
from tests.reliability import build_workdir, losses, run, train_cmd, write_config

pytestmark = pytest.mark.slow

MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step run with complete checkpoints at steps 2 and 4."""
    workdir = build_workdir(tmp_path_factory.mktemp("rel_ckpt"))
    cfg = write_config(workdir, "base", **{"stages.0.max_steps": 4, "checkpoint.keep_last": 3})
    p = run(train_cmd(cfg), workdir)
    assert p.returncode == 0, p.stdout[-4000:]
    ck = workdir / "base" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    return workdir


def _copy(base, name):
    dst = base / name
    shutil.copytree(base / "base", dst)
    return dst


def _truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "delete", "corrupt", "dangling_latest", "missing_meta"],
)
def test_damaged_newest_falls_back_to_the_newest_complete(base, damage, capsys):
    run_dir = _copy(base, f"fb_{damage}")
    ck = run_dir / "checkpoints"
    newest = ck / "step_00000004"
    if damage == "truncate":
        _truncate(newest / MODEL_FILE)
    elif damage == "delete":
        (newest / MODEL_FILE).unlink()
    elif damage == "corrupt":
        _flip(newest / "consolidated.pt")
    elif damage == "dangling_latest":
        (ck / "latest").write_text("step_00000009")  # points at a step that is not there
    else:
        (newest / "meta.json").unlink()
    manager = CheckpointManager(ck, keep_last=2)
    # sizes and presence are checked on every look-up; the checksums (a full read) when resuming
    found = manager.latest(checksums=True) if damage == "corrupt" else manager.latest()
    want = "step_00000004" if damage == "dangling_latest" else "step_00000002"
    assert found == ck / want
    said = capsys.readouterr().out
    named = {"truncate": MODEL_FILE, "delete": MODEL_FILE, "corrupt": "consolidated.pt"}.get(damage, "")
    assert named in said and ("step_00000004" in said or "step_00000009" in said), said
    assert "remove" not in said.lower()


def test_no_complete_checkpoint_stops_instead_of_starting_over(base):
    run_dir = _copy(base, "none_complete")
    ck = run_dir / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        _truncate(ck / step / MODEL_FILE)
    with pytest.raises(ConfigError) as e:
        CheckpointManager(ck, keep_last=2).latest(checksums=True)
    msg = str(e.value)
    assert MODEL_FILE in msg and "step_00000002" in msg and "--resume never" in msg
    assert "remove" not in msg.lower()


def test_pruning_keeps_the_newest_complete_when_newer_ones_are_damaged(base):
    run_dir = _copy(base, "prune")
    ck = run_dir / "checkpoints"
    _truncate(ck / "step_00000004" / MODEL_FILE)
    shutil.copytree(ck / "step_00000004", ck / "step_00000006")  # damaged too
    CheckpointManager(ck, keep_last=1)._prune()
    assert (ck / "step_00000002" / "meta.json").is_file()


def test_truncated_newest_resumes_from_the_previous_and_reproduces_its_steps(base):
    """The issue's case: a truncated model-states file gave `OSError: [Errno 22]` naming no file."""
    run_dir = _copy(base, "resume_fb")
    _truncate(run_dir / "checkpoints" / "step_00000004" / MODEL_FILE)
    before = losses(run_dir)
    cfg = write_config(base, "resume_fb", **{"stages.0.max_steps": 4, "checkpoint.keep_last": 3})  # same schedule
    p = run(train_cmd(cfg), base)
    assert p.returncode == 0, p.stdout[-4000:]
    assert MODEL_FILE in p.stdout and "resumed at step 2" in p.stdout, p.stdout[-4000:]
    after = losses(run_dir)
    assert after == before  # steps 3 and 4 again, exactly: same data position, same RNG
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (run_dir / "checkpoints" / "step_00000002" / "meta.json").is_file()  # the fallback was not pruned
