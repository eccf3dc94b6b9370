"""Per-source numbers of a mixed stage (pipeline.data.mix): samples, answer tokens and answer cross-entropy per
source, summed like every other logged number (pipeline.training.metrics.StepSums) and turned into
`source_samples/<name>`, `source_loss/<name>` (summed answer CE / answer tokens of that source over the logging
interval and all ranks) and `source_epoch/<name>` (the source's own epochs read so far).
"""

from __future__ import annotations

import torch

from pipeline.model.batch import IGNORE_INDEX, Batch


def answer_sources(batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """(n,) the source of each answer position `keep` (B, T-1) selects (predicting token t+1); packed batches
    look up the document that token t+1 belongs to."""
    src = batch.source.to(keep.device)
    if batch.cu_seqlens is None:
        return src[:, None].expand_as(keep)[keep]
    T = keep.shape[1] + 1
    doc = torch.bucketize(torch.arange(1, T, device=keep.device), batch.cu_seqlens[1:].to(keep.device), right=True)
    return src[doc.clamp(max=len(src) - 1)][None].expand_as(keep)[keep]


def source_counts(batch: Batch, n_sources: int) -> torch.Tensor:
    """(2, n_sources) host copy: samples and answer tokens per source of one micro-batch; the collator's dummy
    row (num_samples 0) counts nothing."""
    counts = torch.zeros(2, n_sources)
    if batch.samples and batch.source is not None:
        src = batch.source.cpu()
        counts[0].index_add_(0, src, torch.ones(len(src)))
        answers = (batch.labels[:, 1:] != IGNORE_INDEX).cpu()
        at = answer_sources(batch.replace(source=src), answers)
        counts[1].index_add_(0, at, torch.ones(len(at)))
    return counts


def source_scalars(
    summed: list[float] | None, names: list[str], progress: dict[str, tuple[int, float | None]]
) -> dict[str, float]:
    """The logged per-source numbers from the all-reduced sums (`source_counts`, 2 x n values, then the loss's
    per-source answer CE, n values) and the loader's per-source progress; {} for a single-source stage."""
    if summed is None:
        return {}
    n = len(names)
    samples, tokens, ce = summed[:n], summed[n : 2 * n], summed[2 * n :]
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"source_samples/{name}"] = int(samples[i])
        out[f"source_loss/{name}"] = ce[i] / tokens[i] if tokens[i] else float("nan")
        read, epochs = progress.get(name, (0, None))
        out[f"source_read/{name}"] = read
        if epochs is not None:
            out[f"source_epoch/{name}"] = epochs
    return out
