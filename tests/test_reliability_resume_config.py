"""Resume checks what it resumes (issue 28, item 3): config.json is written once, by the first run; a rerun into
the run dir is compared with it field by field. Shape / method changes exit 2 naming the fields; semantic changes
exit 2 unless --resume-changed, which records them in config_history.jsonl; a finished stage with a changed
definition exits 2 instead of a silent no-op."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from tests.reliability import build_workdir, env, losses, run, train_cmd, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-step single-stage run (checkpoint at step 2, result.json), with `precision: auto` (its output in
    base.log): the reruns below give fp32 explicitly and must match what auto recorded."""
    workdir = build_workdir(tmp_path_factory.mktemp("rel_resume"))
    p = run(train_cmd(write_config(workdir, "base", **{"stages.0.max_steps": 2, "precision": "auto"})), workdir)
    assert p.returncode == 0, p.stdout[-4000:]
    (workdir / "base.log").write_text(p.stdout)
    return workdir


def test_precision_auto_trains_and_the_record_holds_what_it_resolved_to(base):
    """Issue 27 item 6: `auto` is resolved before launch, logged once, trained with, and config.json records the
    resolved value (tests/test_precision.py: a resume that would resolve otherwise is a named change)."""
    from pipeline.training.precision import resolve_precision

    want, why = resolve_precision("cpu")  # this machine's answer (fp32 on a CPU without native bf16)
    log = (base / "base.log").read_text()
    assert log.count("precision auto -> ") == 1 and f"precision auto -> {want} ({why.split(', measured')[0]}" in log
    assert json.loads((base / "base" / "config.json").read_text())["precision"] == want
    assert f"ZeRO-2, {want}, backends" in log  # the stage's start line: what the engine trains in
    assert sorted(losses(base / "base")) == [1, 2]


def _copy(base, name, finished=True):
    dst = base / name
    shutil.copytree(base / "base", dst)
    if not finished:  # as if stopped after the step-2 checkpoint of a longer run
        (dst / "result.json").unlink()
    return dst


def _config_error(base, cfg, *extra: str) -> str:
    """pipeline/train.py's main in this process: a rerun is refused in its configure step, before DeepSpeed or a
    model is touched, so a child process would spend its ~6 s start-up importing only to exit 2."""
    from pipeline.train import main

    mp = pytest.MonkeyPatch()
    for k, v in env(base).items():
        mp.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        mp.delenv(k, raising=False)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            rc = main(["--config", str(cfg), *extra])
    finally:
        mp.undo()
    lines = [x for x in err.getvalue().splitlines() if x.startswith("config error:")]
    assert rc == 2 and len(lines) == 1, err.getvalue()[-4000:]
    return lines[0]


def test_shape_change_exits_2_naming_the_field_even_with_resume_changed(base):
    run_dir = _copy(base, "shape", finished=False)
    record = (run_dir / "config.json").read_text()
    cfg = write_config(base, "shape", **{"stages.0.max_steps": 4, "model.options.rank": 4})
    msg = _config_error(base, cfg, "--resume-changed")
    assert "model.options.rank" in msg and "8 -> 4" in msg, msg
    assert (run_dir / "config.json").read_text() == record  # a refused rerun leaves the record alone


def test_semantic_change_exits_2_unless_resume_changed_which_records_it(base):
    run_dir = _copy(base, "semantic", finished=False)
    record = (run_dir / "config.json").read_text()
    over = {"stages.0.max_steps": 4, "model.options.invert_last_layer_routing": False, "stages.0.lr": 5e-3}
    cfg = write_config(base, "semantic", **over)
    msg = _config_error(base, cfg)
    assert "model.options.invert_last_layer_routing" in msg and "stages.0.lr" in msg and "--resume-changed" in msg
    assert (run_dir / "config.json").read_text() == record

    p = run(train_cmd(cfg, "--resume-changed"), base)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "resumed at step 2" in p.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "config.json").read_text() == record  # still what the first run trained with
    (line,) = (run_dir / "config_history.jsonl").read_text().splitlines()
    h = json.loads(line)
    assert h["changes"]["stages.0.lr"] == {"old": 0.01, "new": 0.005}
    assert h["changes"]["model.options.invert_last_layer_routing"]["new"] is False
    assert "step_00000002" in h["resumed_from"].values()


def test_finished_stage_rerun_with_a_changed_definition_exits_2(base):
    run_dir = _copy(base, "finished")
    cfg = write_config(base, "finished", **{"stages.0.max_steps": 2, "stages.0.task": "auto"})
    msg = _config_error(base, cfg, "--resume-changed")
    assert "stages.0.task" in msg and "finished" in msg, msg
    assert not (run_dir / "config_history.jsonl").exists()
