"""Answer parsers and ScienceQA category scoring on hand-made problems.json-style samples."""

import pytest

from pipeline.eval.parsing import parse_choice, parse_yes_no
from pipeline.eval.sqa_scoring import (
    MCRecord,
    categories_of,
    markdown_table,
    parse_grade,
    score_multiple_choice,
)


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("The answer is B.", 3, 1),
        ("The answer is A", 2, 0),  # end of a truncated generation: still parses
        ("Lecture: plants need light.\nThe answer is C. BECAUSE: ...", 4, 2),
        ("The answer is A. The answer is B.", 2, 0),  # first match wins
        ("the answer is b.", 3, None),  # the reference regex is case-sensitive
        ("THE ANSWER IS B.", 3, None),
        ("Answer: B", 3, None),
        ("B", 3, None),
        ("", 3, None),
        ("The answer is E.", 3, None),  # names no option of this problem
        ("The answer is (B).", 3, None),  # not the trained phrasing
        ("I think the answer is D. The answer is D.", 4, 3),
    ],
)
def test_parse_choice(text, n, expected):
    assert parse_choice(text, n) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("No.", "no"),
        ("no, there is no dog", "no"),
        ("YES, it is", "yes"),
        ("not sure", "no"),  # calculation.py looks for "no" in the first 4 characters (sic)
        ("The answer is yes", "other"),
        ("", "other"),
        ("Maybe", "other"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def _problem(subject="natural science", grade="grade3", hint="", image=None, **kw):
    # problems.json's own field names; image is a file name or null
    return {"subject": subject, "grade": grade, "hint": hint, "image": image, **kw}


@pytest.mark.parametrize(
    "problem, expected",
    [
        (_problem(), ("NAT", "NO", "G1-6")),
        (_problem(subject="social science", grade="grade7", hint="A map of ..."), ("SOC", "TXT", "G7-12")),
        (_problem(subject="language science", grade="grade12", image="image.png"), ("LAN", "IMG", "G7-12")),
        (_problem(hint="Read.", image="image.png", grade="grade6"), ("NAT", "TXT", "IMG", "G1-6")),
        ({"subject": "natural science", "grade": 1, "hint": "", "has_image": True}, ("NAT", "IMG", "G1-6")),
    ],
)
def test_categories(problem, expected):
    assert categories_of(problem) == expected


def test_categories_bad_input_names_field():
    with pytest.raises(KeyError, match="'grade'"):
        categories_of({"subject": "natural science", "hint": "", "image": None})
    with pytest.raises(ValueError, match="subject"):
        categories_of(_problem(subject="maths"))
    with pytest.raises(KeyError, match="has_image"):
        categories_of({"subject": "natural science", "grade": "grade1", "hint": ""})
    with pytest.raises(ValueError, match="grade"):
        parse_grade("first")


def test_score_counts_every_category():
    problems = [
        (_problem(), 0, 0),  # NAT NO G1-6, right
        (_problem(subject="social science", grade="grade8", hint="t"), 1, 0),  # SOC TXT G7-12, wrong
        (_problem(subject="language science", image="i.png", grade="grade10"), 2, 2),  # LAN IMG G7-12, right
        (_problem(hint="t", image="i.png"), 1, None),  # NAT TXT IMG G1-6, unparsed
    ]
    records = [
        MCRecord(key=str(i), answer=a, num_choices=3, pred=p, categories=categories_of(m))
        for i, (m, a, p) in enumerate(problems)
    ]
    s = score_multiple_choice(records, seed=0)
    assert (s["n"], s["correct"], s["unparsed"]) == (4, 2, 1)
    assert s["accuracy"] == 50.0
    assert s["chance"] == pytest.approx(33.33)
    cats = {c: (v["n"], v["correct"]) for c, v in s["categories"].items()}
    assert cats == {
        "NAT": (2, 1),
        "SOC": (1, 0),
        "LAN": (1, 1),
        "TXT": (2, 0),
        "IMG": (2, 1),
        "NO": (1, 1),
        "G1-6": (2, 1),
        "G7-12": (2, 1),
    }
    # the random-fallback variant differs only through the unparsed sample, and is reproducible
    assert s["accuracy_random_fallback"] in (50.0, 75.0)
    assert score_multiple_choice(records, seed=0) == s
    table = markdown_table(s, title="test")
    assert "| accuracy | 50.00 | 0.00 | 100.00 | 0.00 | 50.00 | 100.00 | 50.00 | 50.00 | 50.00 |" in table
    assert "Unparsed outputs (scored wrong in the first row): 1 of 4" in table


def test_random_fallback_is_seeded_and_fair():
    records = [MCRecord(key=str(i), answer=0, num_choices=4, pred=None) for i in range(2000)]
    a = score_multiple_choice(records, seed=1)["accuracy_random_fallback"]
    assert a == score_multiple_choice(records, seed=1)["accuracy_random_fallback"]
    assert 20.0 < a < 30.0
    assert score_multiple_choice(records)["accuracy"] == 0.0


def test_answer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="answer index 3"):
        score_multiple_choice([MCRecord(key="x", answer=3, num_choices=3, pred=0)])


def test_table_hides_empty_columns_without_sqa_subjects():
    recs = [MCRecord(key="a", answer=0, num_choices=2, pred=0, categories=("IMG", "G1-6", "qtype:color"))]
    table = markdown_table(score_multiple_choice(recs))
    assert "| | IMG | G1-6 | qtype:color | Average |" in table
    sqa = [MCRecord(key="a", answer=0, num_choices=2, pred=0, categories=("NAT", "NO", "G1-6"))]
    header = "| | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Average |"
    assert header in markdown_table(score_multiple_choice(sqa))
