"""The trainer's view of pipeline.data: an endless batch stream per stage, its position, its skip counters.

pipeline.data.build_loader gives one epoch per iter() and the same number of batches on every rank (collectives
would hang otherwise); it knows its own (epoch, batch) position and resumes there exactly, without decoding the
skipped samples. Different world size: the per-rank position does not map one to one, so we resume from the
global number of samples consumed in the epoch (same samples per epoch, new split; documented in training.md).

No stage trains on nothing: the collator turns a batch whose every record failed into a dummy row (so that all
ranks still step together); `checked_batches` looks at the first batches of a stage before any optimizer step and
stops with `NoUsableDataError` (naming the sources, the skip reasons and what to change) when no rank got a single
usable sample in them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.data import SKIP_REASONS, SourceConfig, build_loader
from pipeline.data.mix import MixChangedError
from pipeline.training.config import ConfigError, StageConfig, TrainConfig, stage_sources
from pipeline.training.dist import DistContext, all_sum

FIRST_BATCHES_CHECKED = 8
"""Batches per rank looked at before the first optimizer step (at most the rest of the epoch)."""

ADVICE = {
    "bad_features": "the shards' image_features do not fit this model: set model.options.num_query_tokens and "
    "vpg_width to the K and W that `python -m shards.encode` wrote into the shards' index (or re-encode with this "
    "model's VPG), or train on pixel shards with model.vpg_path set",
    "missing_image": "the task needs an image the shards do not carry: check stages[{i}].task and data.image_input",
    "undecodable_image": "the images cannot be decoded: check the shards and data.image_input",
    "unsupported_image": "the image members have a format PIL cannot read: re-encode them as jpg/png/webp",
    "too_long": "every sample is longer than data.max_length: raise data.max_length",
    "missing_field": "the samples lack the fields stages[{i}].task={task} needs: set stages[{i}].task to the shards' "
    "task (auto detects it per sample)",
    "bad_conversation": "the samples are not conversations: set stages[{i}].task to the shards' task (auto detects it)",
    "bad_task": "set stages[{i}].task to the shards' task (auto detects it per sample)",
    "bad_choices": "the multiple-choice fields are malformed: check the builder that wrote the shards",
    "empty_answer": "the answers are empty: check the builder that wrote the shards",
}


class NoUsableDataError(ConfigError):
    """A stage whose first batches hold no usable sample on any rank (raised on every rank, before any step)."""


class StageData:
    def __init__(
        self,
        cfg: TrainConfig,
        s: StageConfig,
        tokenizer: Any,
        num_query_tokens: int,
        ctx: DistContext,
        micro_batch_size: int,
        global_batch_size: int | None = None,
    ):
        """global_batch_size: samples per optimizer step over all ranks; a mixed stage holds its mix per global
        batch (pipeline.data.mix)."""
        sources = [
            SourceConfig(
                shards=x.shards[0] if len(x.shards) == 1 else x.shards, task=x.task, weight=x.weight, name=x.name
            )
            for x in stage_sources(s)
        ]
        self.source_names = [src.name for src in sources]
        self.loader = build_loader(
            cfg.data,
            tokenizer,
            sources=sources,
            batch_size=micro_batch_size,
            num_query_tokens=num_query_tokens,
            seed=cfg.seed + 1000 * s.stage,
            samples_per_epoch=s.samples_per_epoch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            global_batch=global_batch_size,
        )
        self.batch_size = micro_batch_size
        self.world_size = ctx.world_size
        self.samples_per_epoch = self.loader.samples_per_epoch
        self.n_sources = len(sources)
        self._pending = 0

    def steps_for_epochs(self, epochs: float, grad_accum: int) -> int:
        """Optimizer steps in `epochs` passes: whole steps inside the passes (rounding up would start one more pass
        for the last step, reading and counting its samples, skipped ones included, a second time)."""
        return max(1, math.floor(epochs * len(self.loader) / grad_accum))

    def batches(self) -> Iterator[dict[str, Any]]:
        """Endless: the loader advances its epoch itself at the end of each pass."""
        while True:
            yield from self.loader

    def checked_batches(self, device: torch.device, idx: int, s: StageConfig) -> Iterator[Any]:
        """batches(), once the first few have shown a usable sample on some rank (collective: all ranks call it).

        The batches looked at are held back and trained on first; until then the position reported for a
        checkpoint excludes them (they stay within the current epoch, so the arithmetic is a subtraction)."""
        it = self.batches()
        n = max(1, min(FIRST_BATCHES_CHECKED, len(self.loader) - self.loader.batch))
        head = [next(it) for _ in range(n)]
        self._pending = len(head)
        usable = all_sum([sum(b.samples for b in head)], device)[0]
        skipped = self.skip_counters(device)  # collective: every rank reaches it whatever `usable` is
        if usable == 0:
            raise NoUsableDataError(self._nothing_usable(idx, s, n, skipped))
        while head:
            self._pending = len(head) - 1
            yield head.pop(0)
        yield from it

    def _nothing_usable(self, idx: int, s: StageConfig, n: int, skipped: dict[str, int]) -> str:
        reasons = {k.removeprefix("skipped/"): v for k, v in skipped.items() if k.startswith("skipped/")}
        reasons.pop("empty_batch", None)  # the consequence, not a cause
        top = sorted(reasons, key=reasons.get, reverse=True)
        advice = [ADVICE[r].format(i=idx, task=s.task) for r in top if r in ADVICE][:2]
        return (
            f"stages[{idx}] (stage {s.stage}, task {s.task}): no usable sample in the first {n} batch(es) of any "
            f"of the {self.world_size} rank(s) from {s.train_shards or [x.shards for x in s.sources]}; skipped by "
            "reason: "
            f"{', '.join(f'{r} {reasons[r]}' for r in top) or 'none counted'}. Nothing was trained"
            + (f". Fix: {'; '.join(advice)}" if advice else "")
        )

    # ---- position ---------------------------------------------------------------------------------------------
    def state_dict_rank(self) -> dict[str, Any]:
        st = self.loader.state_dict()
        st["batch"] -= self._pending  # batches checked by checked_batches but not trained on yet
        return st

    def state_dict_global(self) -> dict[str, Any]:
        """Rank-independent position (every rank is at the same (epoch, batch): equal batches per rank)."""
        st = self.state_dict_rank()
        return {
            "epoch": st["epoch"],
            "batch": st["batch"],
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "sources": st["sources"],
            "global_batch": st["global_batch"],
        }

    def load_state_dict(self, global_state: dict[str, Any], rank_state: dict[str, Any] | None, samples: int) -> None:
        try:
            if rank_state is not None:
                self.loader.load_state_dict(rank_state)
                return
            # Different world size: keep the epoch and the fraction of it already seen.
            seen = global_state["batch"] * global_state["world_size"] * global_state["batch_size"]
            batch = seen // (self.world_size * self.batch_size)
            mix = {k: global_state[k] for k in ("sources", "global_batch") if k in global_state}
            self.loader.load_state_dict({"epoch": global_state["epoch"], "batch": batch, **mix})
        except MixChangedError as e:
            raise ConfigError(f"resume: {e}") from None

    def source_progress(self) -> dict[str, tuple[int, float | None]]:
        """Per source: samples read over all ranks and the source's own epochs (pipeline.data.mix), at the
        position a checkpoint would record."""
        return self.loader.source_progress(self._pending)

    # ---- counters -----------------------------------------------------------------------------------------------
    def skip_counters(self, device: torch.device) -> dict[str, int]:
        """Skipped samples by reason, and samples truncated to data.max_length per source with the answer tokens
        they lost, summed over ranks (collective; keys aligned by one fixed list on every rank)."""
        local = self.loader.skipped()
        cut = [f"{k}/{i}" for k in ("truncated", "truncated_answer_tokens") for i in range(self.n_sources)]
        known = (*SKIP_REASONS, *cut, "other")  # one fixed order on every rank, whatever reasons each has seen
        counts = [0.0] * len(known)
        for r, n in local.items():
            counts[known.index(r) if r in known else len(known) - 1] += n
        total = dict(zip(known, all_sum(counts, device)))
        out = {f"skipped/{r}": int(total[r]) for r in (*SKIP_REASONS, "other") if total[r]}
        out["skipped_samples"] = sum(out.values())
        out.update({k: int(total[k]) for k in cut if total[k]})
        return out
