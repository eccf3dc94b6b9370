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
from pipeline.training.sources import answer_sources


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

    def total_by_source(
        self, model: FrozenLLMMethod, out: MethodOutput, batch: Batch, n_sources: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`total` and its (n_sources,) breakdown by the rows' `batch.source` (detached): the per-source loss
        of a mixed stage from the same head call, no second one."""
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        heads = row_heads(out, keep.shape)
        rows = model.logits(out.hidden[:, :-1][keep], None if heads is None else heads[keep])
        per_token = F.cross_entropy(rows.float(), targets[keep], reduction="none")
        by_source = per_token.new_zeros(n_sources).index_add_(0, answer_sources(batch, keep), per_token.detach())
        return per_token.sum(), by_source


def text_positions(batch: Batch, where: str) -> torch.Tensor:
    """(B, T-1) bool: the positions t whose next-token distribution (predicting t+1) `TextKL` compares.

    Both t and t+1 real (attention mask) text tokens (neither a visual placeholder) of one document (packed
    batches: not across a cu_seqlens boundary); with where="text_rows" only rows (packed: documents) without a
    visual token; none in the collator's dummy row (num_samples == 0)."""
    ids = batch.input_ids
    T = ids.shape[1]
    real = torch.ones_like(ids, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()
    vis = torch.zeros_like(real) if batch.modality_mask is None else batch.modality_mask.bool()
    text = real & ~vis  # (B, T)
    keep = text[:, :-1] & text[:, 1:]
    if batch.cu_seqlens is not None:  # packed (B == 1): a document per cu_seqlens span
        doc = torch.bucketize(torch.arange(T, device=ids.device), batch.cu_seqlens[1:].to(ids.device), right=True)
        keep &= (doc[:-1] == doc[1:])[None]
        if where == "text_rows":
            has_image = torch.zeros(int(doc.max()) + 1, dtype=torch.bool, device=ids.device)
            has_image.index_put_((doc[vis[0]],), torch.ones((), dtype=torch.bool, device=ids.device))
            keep &= ~has_image[doc[:-1]][None]
    elif where == "text_rows":
        keep &= ~vis.any(1, keepdim=True)
    if batch.num_samples == 0:
        keep &= False
    return keep


@dataclass(frozen=True)
class TextKL:
    """KL(frozen || trained) of the next-token distributions at text positions (`text_positions`), summed over
    them: the frozen LLM's own text behaviour as a guard while the adapters learn the images.

    The teacher is the same model under `adapters_off()` (the frozen LLM through the method's own code; its
    head_index None = the LLM's head), run under no_grad on the token ids alone, so it adds one forward of the
    frozen path and no activation to the backward. Every micro-batch runs that forward, also when it covers no
    position (then on its first row only): under ZeRO-3 each layer's forward gathers its weights collectively,
    so every rank must run the same layers the same number of times. The student's positions use each row's head
    (IAA: its mm_head on image rows with where="all_text")."""

    name: str = "text_kl"
    weight: float = 1.0
    where: str = "text_rows"

    def __post_init__(self) -> None:
        if self.where not in ("text_rows", "all_text"):
            raise ValueError(f"TextKL.where must be text_rows or all_text, got {self.where!r}")

    def count(self, batch: Batch) -> int:
        return int(text_positions(batch, self.where).sum())

    def total(self, model: FrozenLLMMethod, out: MethodOutput, batch: Batch) -> torch.Tensor:
        keep = text_positions(batch, self.where)  # (B, T-1)
        rows = keep.any(1).nonzero().flatten() if batch.cu_seqlens is None else torch.arange(batch.rows)
        if rows.numel() == 0:
            rows = rows.new_zeros(1)
        with torch.no_grad(), model.adapters_off():
            teacher = model(_token_rows(batch, rows))
            logp_frozen = F.log_softmax(model.logits(teacher.hidden[:, :-1][keep[rows]]).float(), -1)  # (n, V)
        heads = row_heads(out, keep.shape)
        student = model.logits(out.hidden[:, :-1][keep], None if heads is None else heads[keep])  # (n, V)
        logp = F.log_softmax(student.float(), -1)
        return F.kl_div(logp, logp_frozen, log_target=True, reduction="sum")


def _token_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows `rows` of `batch` as the frozen LLM reads them: token ids, mask and positions (no image field; under
    adapters_off the placeholders are plain tokens)."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows.to(t.device)]

    return Batch(
        input_ids=pick(batch.input_ids),
        attention_mask=pick(batch.attention_mask),
        position_ids=pick(batch.position_ids),
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
    )


@dataclass
class LossResult:
    loss: torch.Tensor
    """What backward takes: sum over terms of weight x sum / (global count / micro_batches)."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each term's normalised value (detached), by name."""
    by_source: torch.Tensor | None = None
    """Mixed stages (Loss.n_sources > 1): the summed answer CE per source of this micro-batch (detached, not
    normalised: the trainer divides by each source's answer tokens; pipeline.training.sources)."""


class Loss:
    """The terms of the training loss and their global-batch normalisation."""

    def __init__(self, terms: tuple[LossTerm, ...] = (AnswerCrossEntropy(),)):
        if not terms or len({t.name for t in terms}) != len(terms):
            raise ValueError(f"Loss needs at least one term and distinct names, got {[t.name for t in terms]}")
        self.terms = terms
        self.n_sources = 0
        """> 1 (a mixed stage, set by the trainer): LossResult.by_source carries the answer CE per source"""

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
        loss, parts, by_source = None, {}, None
        for term, n in zip(self.terms, global_counts, strict=True):
            if self.n_sources > 1 and isinstance(term, AnswerCrossEntropy) and batch.source is not None:
                summed, by_source = term.total_by_source(model, out, batch, self.n_sources)
            else:
                summed = term.total(model, out, batch)
            value = summed / (max(1.0, n) / micro_batches)
            parts[term.name] = value.detach()
            weighted = value if term.weight == 1.0 else term.weight * value
            loss = weighted if loss is None else loss + weighted
        return LossResult(loss, parts, by_source)


def training_loss(text_kl_weight: float = 0.0, text_kl_where: str = "text_rows") -> Loss:
    """The trainer's loss from the config's `loss` section: the answer cross-entropy, plus TextKL when its weight
    is > 0 (pipeline.training.config.LossConfig)."""
    terms: tuple[LossTerm, ...] = (AnswerCrossEntropy(),)
    if text_kl_weight > 0:
        terms += (TextKL(weight=text_kl_weight, where=text_kl_where),)
    return Loss(terms)


def answer_loss(model: FrozenLLMMethod, batch: Batch, out: MethodOutput | None = None) -> torch.Tensor:
    """One batch on its own (tests, scripts, a world of one): the mean answer cross-entropy over its answer
    tokens (0 when it has none), from `out` or a fresh forward."""
    out = model(batch) if out is None else out
    loss = Loss()
    return loss(model, out, batch, loss.counts(batch), 1).loss
