"""MME layout reading and scoring with fixed predictions, on a small hand-made set in the release layout."""

from pathlib import Path

import pytest
from PIL import Image

from pipeline.eval.mme_data import load_mme, load_subtask
from pipeline.eval.mme_scoring import markdown_table, score_mme


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def make_mme(root: Path) -> Path:
    """existence: flat layout (img + txt side by side); artwork: images/ + questions_answers_YN/ (the release's
    spelling); code_reasoning: flat, png. Two questions per image, one Yes and one No, as MME does."""
    for name in ("a1", "a2"):
        _image(root / "existence" / f"{name}.jpg")
        (root / "existence" / f"{name}.txt").write_text(
            f"Is there a dog in {name}? Please answer yes or no.\tYes\nIs there a cat in {name}?\tNo\n"
        )
    for name in ("b1", "b2", "b3"):
        _image(root / "artwork" / "images" / f"{name}.jpg")
        (root / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (root / "artwork" / "questions_answers_YN" / f"{name}.txt").write_text(
            f"Is {name} by Monet?\tNo\nIs {name} by Manet?\tYes\n"
        )
    _image(root / "code_reasoning" / "c1.png")
    (root / "code_reasoning" / "c1.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    return root


def test_layouts(tmp_path):
    root = make_mme(tmp_path / "MME")
    qs = load_mme(root)
    assert [q.subtask for q in qs].count("existence") == 4
    assert [q.subtask for q in qs].count("artwork") == 6
    art = load_subtask(root / "artwork")
    assert art[0].image_path == root / "artwork" / "images" / "b1.jpg" and art[0].answer == "no"
    assert qs[-1].image_name == "c1.png"


def test_eval_tool_line_format(tmp_path):
    # 'image_name<TAB>question<TAB>answer' lines (eval_tool's ground-truth format) are accepted as well
    _image(tmp_path / "count" / "x.jpg")
    (tmp_path / "count" / "gt.txt").write_text("x.jpg\tAre there two?\tYes\nx.jpg\tAre there three?\tNo\n")
    qs = load_subtask(tmp_path / "count")
    assert [(q.image_name, q.answer) for q in qs] == [("x.jpg", "yes"), ("x.jpg", "no")]


def test_bad_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mme(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="none of the MME subtask folders"):
        load_mme(tmp_path / "empty")
    (tmp_path / "color").mkdir()
    (tmp_path / "color" / "q.txt").write_text("Is it red?\tYes\n")
    with pytest.raises(FileNotFoundError, match="no image 'q"):
        load_subtask(tmp_path / "color")
    _image(tmp_path / "color" / "q.jpg")
    (tmp_path / "color" / "q.txt").write_text("Is it red?\tMaybe\n")
    with pytest.raises(ValueError, match=r"q.txt:1: answer 'maybe'"):
        load_subtask(tmp_path / "color")


def test_scores_with_fixed_predictions(tmp_path):
    qs = load_mme(make_mme(tmp_path / "MME"))
    preds = {
        # existence: a1 both right, a2 one right -> acc 75, acc+ 50, score 125
        "Is there a dog in a1? Please answer yes or no.": "Yes, there is.",
        "Is there a cat in a1?": "No",
        "Is there a dog in a2? Please answer yes or no.": "yes",
        "Is there a cat in a2?": "I think so",  # 'other' -> wrong
        # artwork: b1 both right, b2 both wrong, b3 one right -> acc 50, acc+ 33.33
        "Is b1 by Monet?": "no",
        "Is b1 by Manet?": "yes",
        "Is b2 by Monet?": "yes",
        "Is b2 by Manet?": "no",
        "Is b3 by Monet?": "No.",
        "Is b3 by Manet?": "no",
        # code_reasoning: both right -> 200
        "Does it print 3?": "Yes",
        "Does it print 4?": "No",
    }
    s = score_mme((q, preds[q.question]) for q in qs)
    ex, art, code = (s["subtasks"][t] for t in ("existence", "artwork", "code_reasoning"))
    assert (ex["acc"], ex["acc_plus"], ex["score"], ex["n_other"]) == (75.0, 50.0, 125.0, 1)
    assert art["acc"] == 50.0 and art["acc_plus"] == pytest.approx(100 / 3)
    assert art["score"] == pytest.approx(50 + 100 / 3)
    assert code["score"] == 200.0
    assert s["perception"]["score"] == pytest.approx(125 + 50 + 100 / 3)
    assert s["cognition"]["score"] == 200.0
    assert "count" in s["perception"]["missing"] and s["cognition"]["subtasks"] == ["code_reasoning"]
    table = markdown_table(s)
    assert "| existence | 75.00 | 50.00 | 125.00 | 4 | 1 |" in table
    assert "**208.33**" in table


def test_scores_parse_exactly_the_results_file_text(tmp_path):
    """An answer after whitespace or a newline: scores.json and eval_tool on results/*.txt agree."""
    from pipeline.eval.mme import write_and_score
    from pipeline.eval.parsing import parse_yes_no

    qs = load_mme(make_mme(tmp_path / "MME"), ["existence"])
    texts = ["   Yes", "\nNo, there is none", "\t yes", " \n\n no"]
    scores = write_and_score(tmp_path / "out", qs, texts)
    lines = (tmp_path / "out" / "results" / "existence.txt").read_text().splitlines()
    preds = [line.split("\t")[3] for line in lines]
    official = [parse_yes_no(p) for p in preds]  # calculation.py's rule on the file's 4th field
    assert official == ["yes", "no", "yes", "no"]
    assert scores["subtasks"]["existence"] == score_mme(zip(qs, preds))["subtasks"]["existence"]
    assert scores["subtasks"]["existence"]["n_other"] == 0
