"""The training data pipeline: one list of stages (open_clip style) and a DataLoader wrapper that can resume.

    per source: assigned shards (split by rank and worker; or resampled) -> tar -> records -> json
    -> mix sources by weight -> shuffle buffer -> [skip resumed batches] -> take this worker's quota
    -> group batch_size records -> decode + prompt + tokenise + pad/pack (collate.py)

Determinism: every random choice is seeded by (seed, epoch, rank, worker), so the batch sequence of a rank depends
only on those and the config; the DataLoader returns worker w's batches at positions w, w+nw, ... (its in-order
round robin), and every worker has a fixed quota, so "n batches consumed" tells each worker exactly how many of its
own batches to skip. Resume skips whole batches of raw records before any decoding (cheap).

Equal length on every rank (or collectives hang): batches per rank = samples_per_epoch // (world_size x batch_size),
the same number everywhere; a worker whose shards run out wraps around them (a few repeated samples), one with more
stops at its quota (a few unseen samples this epoch); both are counted in the docs, not silent.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.collate import Collator
from pipeline.data.config import DataConfig, LoaderSpec, SourceConfig
from pipeline.data.records import SkipCounter, iter_tar, parse_json
from pipeline.data.shardlists import (
    assign_shards,
    check_exists,
    expand_shards,
    resampled_shards,
    shard_counts,
    warn_if_few_shards,
)
from pipeline.constants import IMAGE_MEAN, IMAGE_STD

log = logging.getLogger(__name__)


def split_batches(n_batches: int, num_workers: int, worker: int) -> int:
    """Worker w's share of n batches under the DataLoader's round robin (lower ids get the remainder)."""
    return n_batches // num_workers + (1 if worker < n_batches % num_workers else 0)


class PillDataset(IterableDataset):
    """One rank's stream of batches for one epoch (`epoch` and `start_batch` are set by PillLoader before iter)."""

    def __init__(self, cfg: LoaderSpec, tokenizer: Any, with_meta: bool = False):
        super().__init__()
        self.cfg = cfg
        self.urls = [expand_shards(s.shards) for s in cfg.sources]
        for s, urls in zip(cfg.sources, self.urls):
            check_exists(urls, s.name)
            if not cfg.data.resampled:
                warn_if_few_shards(urls, cfg.world_size, cfg.workers_for_split, s.name)
        self.counts = [dict(zip(urls, shard_counts(urls))) for urls in self.urls] if not cfg.data.resampled else None
        if cfg.samples_per_epoch:
            self.samples_per_epoch = cfg.samples_per_epoch
        else:
            self.samples_per_epoch = sum(sum(c.values()) for c in self.counts)
            if self.samples_per_epoch == 0:
                raise ValueError(f"sources {[s.name for s in cfg.sources]} hold no samples")
        self.batches_per_rank = max(1, self.samples_per_epoch // (cfg.world_size * cfg.batch_size))
        d = cfg.data
        self.collate = Collator(d, tokenizer, cfg.num_query_tokens, d.image_mean or IMAGE_MEAN, d.image_std or IMAGE_STD,
                                with_meta=with_meta)
        self.epoch = 0
        self.start_batch = 0

    # ---- stages -------------------------------------------------------------------------------------------------
    def _source_records(self, i: int, worker: int, nw: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Infinite record stream of source i for this slot: its shard share, wrapped; or resampled shards."""
        c, urls, task = self.cfg, self.urls[i], self.cfg.sources[i].task
        if c.data.resampled:
            shards: Any = resampled_shards(urls, c.seed, self.epoch, c.rank, worker, salt=i)
            stride, offset = 1, 0
        else:
            a = assign_shards(urls, c.seed, self.epoch, c.rank, c.world_size, worker, nw, c.data.shuffle_shards,
                              salt=i)
            shards, stride, offset = a.shards, a.sample_stride, a.sample_offset
        while True:
            got = 0
            n = 0  # record position within this pass, for sample-level splitting
            for url in shards:
                for r in parse_json(iter_tar(url, counter), counter):
                    n += 1
                    if (n - 1) % stride != offset:
                        continue
                    got += 1
                    r["__task__"] = task
                    yield r
            if got == 0:
                raise RuntimeError(f"source {c.sources[i].name}: rank {c.rank} worker {worker} found no readable "
                                   f"sample in its shards {list(shards)[:4]}...; see the skip log above")
            # Wrap: the same shards again (the quota, not the shard list, ends the epoch).

    def _mixed(self, worker: int, nw: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        streams = [self._source_records(i, worker, nw, counter) for i in range(len(self.urls))]
        if len(streams) == 1:
            yield from streams[0]
            return
        weights = [s.weight for s in self.cfg.sources]
        rng = random.Random(f"mix/{self.cfg.seed}/{self.epoch}/{self.cfg.rank}/{worker}")
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights)[0]])

    def _shuffle(self, src: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        size = self.cfg.data.shuffle_buffer
        if size <= 1:
            yield from src
            return
        rng = random.Random(f"shuffle/{self.cfg.seed}/{self.epoch}/{self.cfg.rank}/{worker}")
        buf: list[dict[str, Any]] = []
        for r in src:
            buf.append(r)
            if len(buf) >= size:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def epoch_plan(self, epoch: int) -> list[dict[str, int]]:
        """Per worker of this rank: samples its shards hold vs records its quota takes (single source, by shard).

        available < quota: the worker wraps around its shards (repeats); available > quota: it leaves samples unseen
        this epoch. Both are the price of equal batch counts on every rank; balanced shards make them ~0."""
        c, nw = self.cfg, self.cfg.workers_for_split
        if self.counts is None or len(self.urls) != 1:
            return []
        plan = []
        for w in range(nw):
            a = assign_shards(self.urls[0], c.seed, epoch, c.rank, c.world_size, w, nw, c.data.shuffle_shards, salt=0)
            avail = sum(self.counts[0][u] for u in a.shards) // a.sample_stride
            plan.append({"worker": w, "available": avail, "quota": split_batches(self.batches_per_rank, nw, w) *
                         c.batch_size})
        return plan

    def stages(self, worker: int, nw: int, counter: SkipCounter) -> list:
        """The pipeline as one list of stages; each takes the previous iterator."""
        B = self.cfg.batch_size
        quota = split_batches(self.batches_per_rank, nw, worker)
        skip = min(split_batches(self.start_batch, nw, worker), quota)
        return [
            lambda _: self._mixed(worker, nw, counter),
            lambda it: self._shuffle(it, worker),
            lambda it: itertools.islice(it, skip * B, quota * B),  # resume: drop whole batches before decoding
            lambda it: _grouped(it, B),
            lambda it: (self._finish(self.collate(g, counter), worker, counter) for g in it),
        ]

    def _finish(self, batch: dict[str, Any], worker: int, counter: SkipCounter) -> dict[str, Any]:
        batch["_worker"] = worker
        batch["_skipped"] = dict(counter.counts)
        batch["_shards"] = counter.take_shards()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader always asks worker 0 first; after resuming at batch n the next batch belongs to logical
        # worker n % nw, so physical worker w plays logical worker (w + n) % nw (its shards, rng, quota, skip).
        worker = (worker + self.start_batch) % nw
        if nw != self.cfg.workers_for_split:
            raise RuntimeError(f"dataset built for {self.cfg.workers_for_split} workers runs under {nw}; "
                               "iterate it through PillLoader")
        counter = SkipCounter(self.cfg.data.log_skips)
        it: Any = None
        for stage in self.stages(worker, nw, counter):
            it = stage(it)
        yield from it


def _grouped(it: Iterator, n: int) -> Iterator[list]:
    while True:
        g = list(itertools.islice(it, n))
        if not g:
            return
        yield g


def _identity(x: Any) -> Any:
    return x


class PillLoader:
    """Iterable over one epoch of batches per `iter()`; knows its position for checkpoints.

    state_dict() -> {"epoch", "batch", ...}: `batch` = batches consumed in `epoch`. load_state_dict() makes the next
    iteration continue exactly there (same config, world size and num_workers required).
    """

    def __init__(self, cfg: LoaderSpec, tokenizer: Any, start_epoch: int = 0, start_batch: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None, with_meta: bool = False):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + rust threads deadlock otherwise
        self.cfg = cfg
        self.dataset = PillDataset(cfg, tokenizer, with_meta=with_meta)
        self.epoch, self.batch = start_epoch, start_batch
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._skips_done: Counter[str] = Counter()  # finished iterations
        self._skips_now: dict[int, dict[str, int]] = {}  # latest snapshot per worker, current iteration
        self.shards_read: list[str] = []
        """shards this rank opened, in order (all epochs); for no-overlap checks across ranks"""

    def __len__(self) -> int:
        return self.dataset.batches_per_rank

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def skipped(self) -> dict[str, int]:
        """Skips by reason on this rank since the loader was built, summed over DataLoader workers."""
        total = Counter(self._skips_done)
        for snap in self._skips_now.values():
            total.update(snap)
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {"epoch": self.epoch, "batch": self.batch, "seed": c.seed, "batch_size": c.batch_size,
                "num_workers": c.workers_for_split, "world_size": c.world_size, "rank": c.rank,
                "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.cfg
        for k, mine in (("seed", c.seed), ("batch_size", c.batch_size), ("num_workers", c.workers_for_split),
                        ("world_size", c.world_size), ("batches_per_epoch", len(self))):
            if k in state and state[k] != mine:
                # Still resumable, but not to the same sample sequence: say so instead of pretending.
                log.warning("data resume: %s was %s, now %s; the sample order after resume differs", k, state[k], mine)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
        for p in ds.epoch_plan(self.epoch):
            if p["available"] != p["quota"]:
                log.info("data epoch %d rank %d worker %d: shards hold %d samples, quota %d (%s)", self.epoch,
                         self.cfg.rank, p["worker"], p["available"], p["quota"],
                         "wraps around" if p["available"] < p["quota"] else "rest unseen this epoch")
        for snap in self._skips_now.values():  # an earlier iteration left early (break): keep its counts
            self._skips_done.update(snap)
        self._skips_now = {}
        nw = self.cfg.data.num_workers
        kwargs: dict[str, Any] = {}
        if nw > 0:
            kwargs.update(persistent_workers=False, multiprocessing_context="fork")
            if self.prefetch_factor:
                kwargs["prefetch_factor"] = self.prefetch_factor
        # Workers are re-created per epoch (not persistent), so they see the epoch/start_batch set above.
        dl = DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity, pin_memory=self.pin_memory,
                        **kwargs)
        for b in dl:
            self._skips_now[b.pop("_worker")] = b.pop("_skipped")
            self.shards_read.extend(b.pop("_shards"))
            self.batch += 1
            yield b
        for snap in self._skips_now.values():
            self._skips_done.update(snap)
        self._skips_now = {}
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0


def build_loader(cfg: DataConfig, tokenizer: Any, *, sources: list[SourceConfig], batch_size: int,
                 num_query_tokens: int, seed: int = 0, samples_per_epoch: int | None = None, rank: int | None = None,
                 world_size: int | None = None, start_epoch: int = 0, start_batch: int = 0, with_meta: bool = False,
                 **kwargs: Any) -> PillLoader:
    """The trainer's entry point: `cfg` is the `data:` section, the rest is per stage / per rank.

    rank / world_size None: $RANK / $WORLD_SIZE. `start_*` (or load_state_dict) resume mid-epoch. with_meta: batches
    also carry `meta` (key, shard, task and json of each sample; for tests and debugging, not needed to train)."""
    spec = LoaderSpec(cfg, sources, batch_size, num_query_tokens, seed, samples_per_epoch, rank, world_size)
    return PillLoader(spec, tokenizer, start_epoch=start_epoch, start_batch=start_batch, with_meta=with_meta,
                      **kwargs)
