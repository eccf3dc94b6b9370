"""The trainer's view of pipeline.data: an endless batch stream per stage, its position, its skip counters.

pipeline.data.build_loader gives one epoch per iter() and the same number of batches on every rank (collectives
would hang otherwise); it knows its own (epoch, batch) position and resumes there exactly, without decoding the
skipped samples. Different world size: the per-rank position does not map one to one, so we resume from the
global number of samples consumed in the epoch (same samples per epoch, new split; documented in training.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipeline.data import SKIP_REASONS, SourceConfig, build_loader
from pipeline.training.config import StageConfig, TrainConfig
from pipeline.training.dist import DistContext, all_sum


class StageData:
    def __init__(
        self,
        cfg: TrainConfig,
        s: StageConfig,
        tokenizer: Any,
        num_query_tokens: int,
        ctx: DistContext,
        micro_batch_size: int,
    ):
        weights = s.train_weights or [1.0] * len(s.train_shards)
        sources = [SourceConfig(shards=u, task=s.task, weight=w) for u, w in zip(s.train_shards, weights)]
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
        )
        self.batch_size = micro_batch_size
        self.world_size = ctx.world_size
        self.samples_per_epoch = self.loader.samples_per_epoch

    def batches(self) -> Iterator[dict[str, Any]]:
        """Endless: the loader advances its epoch itself at the end of each pass."""
        while True:
            yield from self.loader

    # ---- position ---------------------------------------------------------------------------------------------
    def state_dict_rank(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def state_dict_global(self) -> dict[str, Any]:
        """Rank-independent position (every rank is at the same (epoch, batch): equal batches per rank)."""
        st = self.loader.state_dict()
        return {
            "epoch": st["epoch"],
            "batch": st["batch"],
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, global_state: dict[str, Any], rank_state: dict[str, Any] | None, samples: int) -> None:
        if rank_state is not None:
            self.loader.load_state_dict(rank_state)
            return
        # Different world size: keep the epoch and the fraction of it already seen.
        seen = global_state["batch"] * global_state["world_size"] * global_state["batch_size"]
        batch = seen // (self.world_size * self.batch_size)
        self.loader.load_state_dict({"epoch": global_state["epoch"], "batch": batch})

    # ---- counters -----------------------------------------------------------------------------------------------
    def skip_counters(self, device: torch.device) -> dict[str, int]:
        """Skipped samples by reason, summed over ranks (collective; reasons aligned by a fixed sorted list)."""
        local = self.loader.skipped()
        known = (*SKIP_REASONS, "other")  # one fixed order on every rank, whatever reasons each has seen
        counts = [0.0] * len(known)
        for r, n in local.items():
            counts[known.index(r) if r in known else len(known) - 1] += n
        total = all_sum(counts, device)
        out = {f"skipped/{r}": int(n) for r, n in zip(known, total) if n}
        out["skipped_samples"] = int(sum(total))
        return out
