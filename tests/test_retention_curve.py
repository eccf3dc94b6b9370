"""Retention on the training curve (eval.retention_every) and loss.text_kl under DeepSpeed on 2 ranks.

pipeline.report's retention.png comes from metrics.jsonl's retention/* rows; the trainer writes those rows (step 0,
then every N steps) on the tiny demo under ZeRO-2 and ZeRO-3 with 2 ranks, together with the KL guard's own
loss/text_kl and activation checkpointing: the teacher forward (no_grad, adapters off) and the probe (every rank
decodes the same prompts) keep every rank's collectives in step, so neither run hangs.
"""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from pipeline.report import make_report, plot_retention, read_metrics
from pipeline.training.config import ConfigError, load_config
from tests.test_train_ds import REPO, _config, _run, workdir  # noqa: F401  (fixture)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_plots_retention_beside_the_loss_from_metrics_jsonl(tmp_path):
    rows = [{"step": 0, "retention/identical": 100.0, "retention/mean_kl": 0.0}]
    rows += [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 7)]
    rows[4].update({"retention/identical": 75.0, "retention/mean_kl": 0.125})  # step 4
    rows[6].update({"retention/identical": 50.0, "retention/mean_kl": 0.5})  # step 6
    _write(tmp_path / "metrics.jsonl", rows)
    written = make_report(tmp_path)
    png = matplotlib.image.imread(written["retention"])
    assert written["retention"] == tmp_path / "retention.png" and png.ndim == 3 and png.shape[0] > 100
    md = (tmp_path / "report.md").read_text()
    assert "text retention (identical % / mean KL nats per token): step 0: 100% / 0, step 4: 75% / 0.125, " in md
    assert "step 6: 50% / 0.5" in md and "![retention](retention.png)" in md
    # no retention rows: no picture (and no line)
    _write(tmp_path / "metrics.jsonl", rows[1:4])
    assert plot_retention(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "x") is None
    assert "retention" not in make_report(tmp_path, tmp_path / "plain")


def test_retention_settings_are_validated():
    for key, bad in (("retention_every", -1), ("retention_prompts", 0), ("retention_max_new_tokens", 0)):
        with pytest.raises(ConfigError, match=f"eval.{key} must be >= "):
            load_config("configs/demo.yaml", [f"eval.{key}={bad}"])
    with pytest.raises(ConfigError, match="loss.text_kl.where: must be one of text_rows|all_text"):
        load_config("configs/demo.yaml", ["loss.text_kl.where=images"])


def _train(root, zero: int) -> list[dict]:
    """The tiny demo's stage 2 on 2 ranks, 4 steps, KL guard on every text position, retention every 2 steps."""
    name = f"retention_z{zero}"
    if (root / name / "result.json").is_file():  # the other parametrisation already trained it
        return read_metrics(root / name / "metrics.jsonl")
    cfg = _config(
        root,
        name,
        precision="fp32",
        **{
            "stages.0.max_steps": 4,
            "stages.0.grad_accum": 1,
            "model.activation_checkpointing": True,
            "eval": {"enabled": False, "retention_every": 2, "retention_prompts": 3, "retention_max_new_tokens": 4},
            "loss": {"text_kl": {"weight": 0.5, "where": "all_text"}},
            "log": {"every_steps": 3, "progress_bar": False, "tensorboard": True},
        },
    )
    extra = ["--ds_config", str(REPO / "ds_configs" / "zero3.json")] if zero == 3 else []
    rcs, out = _run(cfg, extra=extra)
    assert rcs == [0, 0], out[-4000:]
    assert f"ZeRO-{zero}" in (root / name / "train.log").read_text()
    return read_metrics(root / name / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_log_retention_and_text_kl_on_the_tiny_demo(workdir, zero):  # noqa: F811
    rows = _train(workdir, zero)
    # step 0 (a fresh stage), every 2nd step, and the log steps (3, and the last)
    assert [r["step"] for r in rows] == [0, 2, 3, 4]
    probed = {r["step"]: r for r in rows if "retention/identical" in r}
    assert sorted(probed) == [0, 2, 4]
    assert probed[0]["retention/identical"] == 100.0 and abs(probed[0]["retention/mean_kl"]) < 1e-5  # init = frozen
    for r in probed.values():
        assert 0 <= r["retention/identical"] <= 100 and math.isfinite(r["retention/mean_kl"])
    for r in rows[1:]:
        assert r["loss/text_kl"] >= 0 and math.isfinite(r["loss/answer_ce"])
        assert r["loss"] == pytest.approx(r["loss/answer_ce"] + 0.5 * r["loss/text_kl"], rel=1e-4)
    assert rows[-1]["loss/text_kl"] > 0  # the adapters moved the text positions after the image
    assert "retention" in make_report(workdir / f"retention_z{zero}")
    if zero == 3:  # the teacher forward left ZeRO-3's gathers and gradient hooks alone: the same training as ZeRO-2
        for r2, r3 in zip(_train(workdir, 2), rows):
            for key in ("loss", "loss/text_kl", "retention/mean_kl"):
                if key in r2:
                    assert r3[key] == pytest.approx(r2[key], rel=2e-2, abs=1e-4), (r2["step"], key, r2[key], r3[key])
