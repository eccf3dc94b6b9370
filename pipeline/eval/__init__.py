"""Evaluation: ScienceQA (``python -m pipeline.eval.scienceqa``), MME (``python -m pipeline.eval.mme``) and the
multiple-choice evaluator the trainer calls on the demo's held-out split.

Scoring modules (parsing, sqa_scoring, mme_scoring, mme_data) import no torch, so reports stay cheap;
``evaluate_multiple_choice`` is imported lazily for the same reason.
"""


def __getattr__(name):
    if name == "evaluate_multiple_choice":
        from pipeline.eval.multiple_choice import evaluate_multiple_choice

        return evaluate_multiple_choice
    raise AttributeError(name)
