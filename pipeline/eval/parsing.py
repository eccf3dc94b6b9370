"""Answer parsers shared by every evaluation.

- Multiple choice (ScienceQA and the demo's held-out split): the paper's rule, the FIRST match of
  ``The answer is ([A-Z])`` in the generated text. Case-sensitive like the reference's regex, so
  "the answer is b" does not parse; a letter outside the sample's options does not parse either
  (the reference's ``get_pred_idx`` treats it like a failed parse).
  Difference from the reference: LLaVA/LaVIN compile ``The answer is ([A-Z]).`` (one more character
  required after the letter) and accept only a single match; we use the spec's pattern, first match,
  so "...The answer is B" at the very end of a truncated generation still parses.
- Yes/no (MME): MME's official ``eval_tool/calculation.py`` rule: lower-case the text; exactly
  "yes"/"no" -> itself; else look at the first 4 characters: contains "yes" -> yes, else contains
  "no" -> no, else "other" (always wrong). So "No, ..." -> no, "Yes." -> yes, "not sure" -> no (sic,
  kept for comparability with published numbers), "The answer is yes" -> other.
"""

from __future__ import annotations

import random
import re

ANSWER_PATTERN = re.compile(r"The answer is ([A-Z])")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_choice(text: str, num_choices: int) -> int | None:
    """Index of the chosen option (0 = A), or None when the text does not parse or names no option."""
    if num_choices < 1 or num_choices > len(OPTION_LETTERS):
        raise ValueError(f"num_choices must be in 1..26, got {num_choices}")
    match = ANSWER_PATTERN.search(text or "")
    if match is None:
        return None
    index = OPTION_LETTERS.index(match.group(1))
    return index if index < num_choices else None


def random_fallback(pred: int | None, num_choices: int, rng: random.Random) -> int:
    """The reference's variant: an unparsed prediction becomes a uniformly random option."""
    return pred if pred is not None else rng.randrange(num_choices)


def parse_yes_no(text: str) -> str:
    """'yes' | 'no' | 'other', exactly as MME's calculation.py (see module docstring)."""
    pred = (text or "").lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"
