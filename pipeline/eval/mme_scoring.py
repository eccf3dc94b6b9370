"""MME scores as MME's official ``eval_tool/calculation.py`` computes them.

Per subtask: acc = fraction of questions right; acc+ = fraction of images whose two questions are both right
(calculation.py counts an image when its number of right answers == 2); score = 100 * acc + 100 * acc+ (max 200).
Perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4 cognition ones (max 800).
A prediction is parsed with ``parse_yes_no``; "other" is always wrong. Totals list the subtasks that were
missing, instead of silently summing fewer terms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from pipeline.eval.mme_data import COGNITION, PERCEPTION, MMEQuestion
from pipeline.eval.parsing import parse_yes_no


def score_subtask(items: list[tuple[MMEQuestion, str]]) -> dict:
    """items: (question, generated text) pairs of one subtask."""
    per_image: dict[str, int] = defaultdict(int)
    right = other = 0
    for q, text in items:
        pred = parse_yes_no(text)
        other += pred == "other"
        ok = pred == q.answer
        right += ok
        per_image[q.image_name] += ok
    n = len(items)
    acc = 100.0 * right / n if n else 0.0
    acc_plus = 100.0 * sum(v == 2 for v in per_image.values()) / len(per_image) if per_image else 0.0
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc + acc_plus,
        "n_questions": n,
        "n_images": len(per_image),
        "n_other": other,
    }


def score_mme(items: Iterable[tuple[MMEQuestion, str]]) -> dict:
    """Per-subtask scores plus the perception and cognition totals."""
    by_task: dict[str, list] = defaultdict(list)
    for q, text in items:
        by_task[q.subtask].append((q, text))
    if not by_task:  # a score of 0 would read as a model that answers everything wrong
        raise ValueError("no MME question was scored: the benchmark folder held none, or every one was skipped")
    subtasks = {task: score_subtask(rows) for task, rows in by_task.items()}
    result: dict = {"subtasks": subtasks}
    for name, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [t for t in tasks if t in subtasks]
        result[name] = {
            "score": sum(subtasks[t]["score"] for t in present),
            "subtasks": present,
            "missing": [t for t in tasks if t not in subtasks],
        }
    return result


def markdown_table(scores: dict) -> str:
    """One row per subtask (acc, acc+, score, counts) then the two totals."""
    lines = ["| subtask | acc | acc+ | score | questions | unparsed ('other') |", "|---|---|---|---|---|---|"]
    for group in ("perception", "cognition"):
        for task in scores[group]["subtasks"]:
            s = scores["subtasks"][task]
            lines.append(
                f"| {task} | {s['acc']:.2f} | {s['acc_plus']:.2f} | {s['score']:.2f} | {s['n_questions']} |"
                f" {s['n_other']} |"
            )
    for group, top in (("perception", 2000), ("cognition", 800)):
        g = scores[group]
        missing = f" (missing: {', '.join(g['missing'])})" if g["missing"] else ""
        lines.append(f"| **{group}** (max {top}) | | | **{g['score']:.2f}** | | {missing} |")
    return "\n".join(lines) + "\n"
