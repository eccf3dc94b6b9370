"""MME end to end with the tiny model on a hand-made set in the release layout."""

import json

from pipeline.eval.mme_data import load_subtask
from pipeline.eval.mme_scoring import score_mme
from tests.test_eval_mme_scoring import make_mme


def test_mme_cli_end_to_end(tiny_dirs, tmp_path, capsys):
    from pipeline.eval.mme import main
    from pipeline.model import PILLConfig, load_pill

    root = make_mme(tmp_path / "MME")
    model = load_pill(
        tiny_dirs["llm"], tiny_dirs["vpg"], cfg=PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64)
    )
    export = model.save_adapter(tmp_path / "export")
    out = tmp_path / "out"
    assert (
        main(
            [
                "--llm",
                str(tiny_dirs["llm"]),
                "--vpg",
                str(tiny_dirs["vpg"]),
                "--adapter",
                str(export),
                "--mme-root",
                str(root),
                "--out-dir",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["subtasks"]) == {"existence", "artwork", "code_reasoning"}
    assert scores["subtasks"]["artwork"]["n_questions"] == 6
    # eval_tool-format results: 4 fields per line, re-scoring them gives the same numbers
    lines = (out / "results" / "existence.txt").read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)
    qs = load_subtask(root / "existence")
    preds = [line.split("\t")[3] for line in lines]
    assert score_mme(zip(qs, preds))["subtasks"]["existence"] == scores["subtasks"]["existence"]
    assert "**perception** (max 2000)" in capsys.readouterr().out
