"""ScienceQA scoring: the paper's Table-1 row (NAT SOC LAN TXT IMG NO G1-6 G7-12 Average).

Category membership follows ScienceQA's own evaluation (``get_scores`` in lupantech/ScienceQA, reused by
LLaVA / LaVIN / mm-cot):
- NAT / SOC / LAN: ``subject`` is "natural science" / "social science" / "language science";
- TXT: the problem has a text context, i.e. a non-empty ``hint`` (TXT and IMG overlap: a problem with both
  counts in both);
- IMG: the problem has an image;
- NO: neither hint nor image;
- G1-6 / G7-12: ``grade`` "grade1".."grade6" / "grade7".."grade12".
Average is the accuracy over all problems (not the mean of the columns), as in the paper.

Two accuracies are reported: unparsed outputs scored wrong (our default), and the reference's variant where
an unparsed output becomes a random option (seeded, so reruns agree).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.eval.parsing import random_fallback

CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


@dataclass(frozen=True)
class MCRecord:
    """One scored multiple-choice problem: gold index, parsed prediction (None = unparsed), its categories."""

    key: str
    answer: int
    num_choices: int
    pred: int | None
    categories: tuple[str, ...] = ()


def _field(meta: Mapping, name: str, where: str):
    if name not in meta:
        raise KeyError(f"{where}: field '{name}' missing (have: {sorted(meta)})")
    return meta[name]


def parse_grade(grade) -> int:
    """'grade7' | '7' | 7 -> 7."""
    text = str(grade).strip().lower().removeprefix("grade")
    if not text.isdigit():
        raise ValueError(f"grade {grade!r} is not 'gradeN' or an integer")
    return int(text)


def has_image(meta: Mapping) -> bool:
    """``has_image`` when the shard wrote it; else ScienceQA's own ``image`` field (file name or null)."""
    if "has_image" in meta:
        return bool(meta["has_image"])
    if "image" in meta:
        return bool(meta["image"])
    raise KeyError(f"sample {meta.get('key', '?')}: neither 'has_image' nor 'image' field (have: {sorted(meta)})")


def categories_of(meta: Mapping, strict: bool = True) -> tuple[str, ...]:
    """ScienceQA categories of one problem (see module docstring); missing fields raise naming the field.
    strict=False lets a subject outside ScienceQA's three (the demo's "demo") just get no subject column."""
    where = f"sample {meta.get('key', meta.get('id', '?'))}"
    subject = str(_field(meta, "subject", where)).strip().lower()
    if subject not in SUBJECTS and strict:
        raise ValueError(f"{where}: subject {subject!r} is not one of {sorted(SUBJECTS)}")
    cats = [SUBJECTS[subject]] if subject in SUBJECTS else []
    text = bool(_field(meta, "hint", where))
    image = has_image(meta)
    if text:
        cats.append("TXT")
    if image:
        cats.append("IMG")
    if not text and not image:
        cats.append("NO")
    grade = parse_grade(_field(meta, "grade", where))
    if 1 <= grade <= 6:
        cats.append("G1-6")
    elif 7 <= grade <= 12:
        cats.append("G7-12")
    else:
        raise ValueError(f"{where}: grade {grade} outside 1..12")
    return tuple(cats)


def _acc(correct: int, n: int) -> float | None:
    return round(100.0 * correct / n, 2) if n else None


def score_multiple_choice(records: Iterable[MCRecord], seed: int = 0) -> dict:
    """Accuracy (percent), per category, unparsed count, chance level and the random-fallback variant."""
    records = list(records)
    rng = random.Random(seed)
    counts = {cat: [0, 0, 0] for cat in CATEGORIES}  # n, correct, correct with random fallback
    n = correct = correct_rand = unparsed = 0
    chance = 0.0
    for rec in records:
        if not 0 <= rec.answer < rec.num_choices:
            raise ValueError(f"sample {rec.key}: answer index {rec.answer} outside 0..{rec.num_choices - 1}")
        hit = rec.pred == rec.answer
        hit_rand = random_fallback(rec.pred, rec.num_choices, rng) == rec.answer
        n += 1
        correct += hit
        correct_rand += hit_rand
        unparsed += rec.pred is None
        chance += 1.0 / rec.num_choices
        for cat in rec.categories:
            row = counts.setdefault(cat, [0, 0, 0])
            row[0] += 1
            row[1] += hit
            row[2] += hit_rand
    return {
        "n": n,
        "correct": correct,
        "accuracy": _acc(correct, n),
        "unparsed": unparsed,
        "chance": round(100.0 * chance / n, 2) if n else None,
        "accuracy_random_fallback": _acc(correct_rand, n),
        "seed": seed,
        "categories": {
            cat: {
                "n": c[0],
                "correct": c[1],
                "accuracy": _acc(c[1], c[0]),
                "accuracy_random_fallback": _acc(c[2], c[0]),
            }
            for cat, c in counts.items()
        },
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(scores: Mapping, title: str = "") -> str:
    """The paper's Table-1 row plus counts, the random-fallback row and the unparsed count.
    All eight ScienceQA columns are shown when the data has ScienceQA subjects; otherwise (the demo) only the
    columns that have samples."""
    per = scores["categories"]
    is_sqa = any(per.get(c, {}).get("n") for c in SUBJECTS.values())
    cats = [c for c in per if c in CATEGORIES and (is_sqa or per[c]["n"])] + [c for c in per if c not in CATEGORIES]
    header = "| | " + " | ".join(cats) + " | Average |"
    sep = "|---" * (len(cats) + 2) + "|"
    rows = [
        "| accuracy | " + " | ".join(_cell(per[c]["accuracy"]) for c in cats) + f" | {_cell(scores['accuracy'])} |",
        f"| accuracy, unparsed -> random (seed {scores['seed']}) | "
        + " | ".join(_cell(per[c]["accuracy_random_fallback"]) for c in cats)
        + f" | {_cell(scores['accuracy_random_fallback'])} |",
        "| n | " + " | ".join(str(per[c]["n"]) for c in cats) + f" | {scores['n']} |",
    ]
    lines = [f"### {title}", ""] if title else []
    lines += [header, sep, *rows, ""]
    lines.append(
        f"Unparsed outputs (scored wrong in the first row): {scores['unparsed']} of {scores['n']}; "
        f"chance level {_cell(scores['chance'])}."
    )
    return "\n".join(lines) + "\n"
