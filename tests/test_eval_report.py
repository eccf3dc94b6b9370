"""pipeline.report on a synthetic metrics.jsonl + eval.json."""

import json
import math

import pytest
from PIL import Image

from pipeline.eval.sqa_scoring import MCRecord, score_multiple_choice
from pipeline.report import gate_table, main, read_metrics


def _write_run(run, n_layers=4):
    recs = []
    for step in range(1, 21):
        recs.append({"step": step, "stage": 1, "loss": 4 - 0.1 * step, "lr": 1e-3, "samples_per_s": 10.0})
    for step in range(1, 21):
        rec = {"step": step, "stage": 2, "loss": 2 * math.exp(-step / 10), "lr": 2e-3, "tokens_per_s": 500.0 + step}
        rec.update({f"gate/layer_{i}": step * 0.001 * (i + 1) for i in range(n_layers)})
        recs.append(rec)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    mc = score_multiple_choice([MCRecord(key="a", answer=0, num_choices=2, pred=0, categories=("NAT", "IMG"))])
    (run / "eval.json").write_text(json.dumps({"heldout": mc, "heldout_no_images": mc, "misc": {"x": 1}}))
    (run / "config.yaml").write_text("stage: 2\nrank: 8\n")


def test_report_writes_pictures_and_summary(tmp_path, capsys):
    _write_run(tmp_path)
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    rep = tmp_path / "rep"
    for name in ("loss.png", "gates.png"):
        with Image.open(rep / name) as im:
            assert im.size[0] > 300
    md = (rep / "report.md").read_text()
    assert "stage 1 loss: first 3.9000, last 2.0000" in md
    assert "rank: 8" in md
    assert "stage 2 tokens_per_s (mean over the second half): 515.50" in md
    assert "### heldout_no_images" in md and "| accuracy | 100.00 |" in md
    assert '"x": 1' in md and "### misc" in md
    assert "per layer 0..3 at step 20: 0.020, 0.040, 0.060, 0.080" in md
    assert "![gates](gates.png)" in md


def test_gate_table_and_missing_eval(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert gate_table(read_metrics(tmp_path / "metrics.jsonl")) == ([], [])
    assert main([str(tmp_path)]) == 0
    assert not (tmp_path / "gates.png").exists()
    assert "No eval.json" in (tmp_path / "report.md").read_text()


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not JSON"):
        main([str(tmp_path)])


def test_trainer_layout(tmp_path):
    """What pipeline/train.py writes for the embedded default: stage{N}/metrics.jsonl, gate_abs lists, result.json,
    config.json, one flat eval dict per variant."""
    for stage in (1, 2):
        d = tmp_path / f"stage{stage}"
        d.mkdir()
        rows = [
            {
                "step": s,
                "loss": 3.0 / s,
                "lr": 1e-3,
                "samples_per_s": 4.0,
                "samples": 8 * s,
                "grad_norm": float("nan"),
                **({"gate_abs": [0.01 * s, 0.02 * s]} if stage == 2 else {}),
            }
            for s in range(1, 6)
        ]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (d / "result.json").write_text(json.dumps({"stage": stage, "steps": 5, "final_loss": 0.6}))
    (tmp_path / "config.json").write_text(json.dumps({"name": "demo"}))
    mc = score_multiple_choice([MCRecord(key="a", answer=0, num_choices=2, pred=1, categories=("IMG",))])
    (tmp_path / "eval.json").write_text(
        json.dumps({"accuracy": 0.0, "accuracy_no_image": 0.0, "n": 1, "with_image": mc, "without_image": mc})
    )
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "stage 1 loss: first 3.0000" in md and "stage 2 samples seen (last record): 40" in md
    assert "per layer 0..1 at step 5: 0.050, 0.100" in md
    assert '"name": "demo"' in md and "## stage2 result" in md
    assert "### with_image" in md and "### without_image" in md and "- accuracy_no_image: 0.0" in md
    assert (tmp_path / "gates.png").is_file() and (tmp_path / "loss.png").is_file()
