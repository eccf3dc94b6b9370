"""The training loss of a micro-batch, from the method's hidden states: the one place where loss terms plug in.

A method's forward returns final-normed hidden states (pipeline.model.base.MethodOutput); the loss here applies
the method's head (`model.logits`) where a term needs it. Each term reports a summed value and the count it is a
sum over; the trainer all-reduces every term's count over the global batch once per optimizer step (from the
host copy of the batches, no device sync) and each term's sum is divided by its global count, so every counted
item of the global batch weighs the same whatever micro-batch or rank it sits on (transformers'
`num_items_in_batch`, torchtitan). A new term (a KL on text rows against the frozen LLM, a per-source loss) is one
`LossTerm` added to the list given to `Loss`; its value is logged under its name.

Legend: B rows, T tokens, D width, V vocab, n answer positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline.model.base import FrozenLLMMethod, MethodOutput, row_heads
from pipeline.model.batch import IGNORE_INDEX, Batch


class LossTerm(Protocol):
    name: str
    """The key of this term in LossResult.parts and in the logged metrics (`loss/<name>`)."""
    weight: float

    def count(self, batch: Batch) -> int:
        """What the term's sum is a sum over, in this micro-batch (host copy: no device sync)."""

    def total(self, model: FrozenLLMMethod, out: MethodOutput, batch: Batch) -> torch.Tensor:
        """The summed term over this micro-batch: a scalar fp32 tensor carrying the gradient."""


@dataclass(frozen=True)
class AnswerCrossEntropy:
    """Next-token cross-entropy at the answer positions (labels != IGNORE_INDEX), summed over them.

    The head runs on the answer rows alone, and only those rows' logits are upcast to fp32: never the (B, T, V)
    logits of the whole batch (pipeline.memory counts this)."""

    name: str = "answer_ce"
    weight: float = 1.0

    def count(self, batch: Batch) -> int:
        return batch.answer_tokens()

    def total(self, model: FrozenLLMMethod, out: MethodOutput, batch: Batch) -> torch.Tensor:
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1)
        heads = row_heads(out, keep.shape)
        rows = model.logits(out.hidden[:, :-1][keep], None if heads is None else heads[keep])  # (n, V)
        return F.cross_entropy(rows.float(), targets[keep], reduction="sum")


@dataclass
class LossResult:
    loss: torch.Tensor
    """What backward takes: sum over terms of weight x sum / (global count / micro_batches)."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each term's normalised value (detached), by name."""


class Loss:
    """The terms of the training loss and their global-batch normalisation."""

    def __init__(self, terms: tuple[LossTerm, ...] = (AnswerCrossEntropy(),)):
        if not terms or len({t.name for t in terms}) != len(terms):
            raise ValueError(f"Loss needs at least one term and distinct names, got {[t.name for t in terms]}")
        self.terms = terms

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def counts(self, batch: Batch) -> list[int]:
        """Per term, what its sum counts in `batch` (the trainer sums these over the global batch)."""
        return [t.count(batch) for t in self.terms]

    def __call__(
        self,
        model: FrozenLLMMethod,
        out: MethodOutput,
        batch: Batch,
        global_counts: list[float],
        micro_batches: int,
    ) -> LossResult:
        """The loss of one micro-batch of a global batch of `micro_batches` micro-batches (world x accumulation).

        `global_counts[i]`: term i's count summed over the whole global batch. A term's sum is divided by
        global_count / micro_batches: DeepSpeed's 1/accumulation and its mean over ranks multiply by exactly
        1/micro_batches, so the optimizer step sees sum over the global batch / global count."""
        loss, parts = None, {}
        for term, n in zip(self.terms, global_counts, strict=True):
            value = term.total(model, out, batch) / (max(1.0, n) / micro_batches)
            parts[term.name] = value.detach()
            weighted = value if term.weight == 1.0 else term.weight * value
            loss = weighted if loss is None else loss + weighted
        return LossResult(loss, parts)


def answer_loss(model: FrozenLLMMethod, batch: Batch, out: MethodOutput | None = None) -> torch.Tensor:
    """One batch on its own (tests, scripts, a world of one): the mean answer cross-entropy over its answer
    tokens (0 when it has none), from `out` or a fresh forward."""
    out = model(batch) if out is None else out
    loss = Loss()
    return loss(model, out, batch, loss.counts(batch), 1).loss
