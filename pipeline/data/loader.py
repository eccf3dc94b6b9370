"""The training data pipeline: one list of stages (open_clip style) and a DataLoader wrapper that can resume.

    per source: this slot's pieces of the epoch's sample sequence -> tar -> records -> json
    -> shuffle buffer, per pass -> [wrap: next pass] -> mix sources by weight -> [skip resumed batches]
    -> take this worker's quota -> group batch_size records -> decode + prompt + tokenise + pad/pack (collate.py)

Exact epochs: with the sample counts known, each (rank, worker) slot reads exactly its quota of distinct positions
of the epoch's global sequence (shardlists.slot_pieces), so on one source an epoch is a permutation of
`len(loader) x world x batch_size` samples: nothing repeats, and fewer than one global batch stays unseen. The
shuffle buffer runs over one pass of the slot's pieces and is drained at its end, so it can never pull records of
a later pass in ahead of this one's. A slot reads more than one pass only when its shards gave fewer records than
counted (a lost shard, bad records): it repeats its own samples, or, when none of its shards is readable, reads the
others' shards, and so still delivers its quota (counted, never fatal).

Determinism: every random choice is seeded by (seed, epoch, rank, worker), so the batch sequence of a rank depends
only on those and the config; the DataLoader returns worker w's batches at positions w, w+nw, ... (its in-order
round robin), and every worker has a fixed quota, so "n batches consumed" tells each worker exactly how many of its
own batches to skip. Resume skips whole batches of raw records before any decoding (cheap).

Equal length on every rank (or collectives hang): batches per rank = samples_per_epoch // (world_size x batch_size),
the same number everywhere.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.constants import IMAGE_MEAN, IMAGE_STD
from pipeline.data.collate import Collator
from pipeline.data.config import DataConfig, LoaderSpec, SourceConfig
from pipeline.data.mix import (
    MixSchedule,
    MixSpec,
    check_same_mix,
    describe_sources,
    slot_plan,
    slot_range,
    source_pieces,
)
from pipeline.data.records import SkipCounter, iter_tar, parse_json, read_piece
from pipeline.data.shardlists import (
    Piece,
    assign_shards,
    check_exists,
    epoch_order,
    expand_shards,
    index_urls,
    resampled_shards,
    shard_counts,
    slot_pieces,
    warn_if_few_shards,
)
from pipeline.model.batch import Batch

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
        self.counts = [self._counts(s, urls) for s, urls in zip(cfg.sources, self.urls)]
        self.samples_per_epoch = cfg.samples_per_epoch or sum(sum(c) for c in self.counts if c)
        for s, urls in zip(cfg.sources, self.urls):
            if not probe_readable(urls):
                raise ValueError(
                    f"source {s.name}: no readable sample in any of the {len(urls)} shard(s) "
                    f"{urls[:4]}{'...' if len(urls) > 4 else ''}; see the skip log above"
                )
        if self.samples_per_epoch == 0:
            raise ValueError(f"sources {[s.name for s in cfg.sources]} hold no samples")
        self.batches_per_rank = max(1, self.samples_per_epoch // (cfg.world_size * cfg.batch_size))
        d = cfg.data
        self.collate = Collator(
            d,
            tokenizer,
            cfg.num_query_tokens,
            d.image_mean or IMAGE_MEAN,
            d.image_std or IMAGE_STD,
            with_meta=with_meta,
        )
        self.epoch = 0
        self.start_batch = 0
        self.mix = (
            MixSchedule(MixSpec(tuple(s.weight for s in cfg.sources), cfg.global_batch, cfg.seed))
            if len(cfg.sources) > 1
            else None
        )
        self._plan: tuple | None = None  # (epoch, nw, ids, quota) of the mix, computed once per epoch

    def _counts(self, s: SourceConfig, urls: list[str]) -> list[int] | None:
        """Samples per shard of one source; None: unknown (resampled, or remote shards without an index)."""
        c = self.cfg
        check_exists(urls, s.name)
        counts = None if c.data.resampled else shard_counts(urls, index_urls(s.shards))
        if counts is not None and None in counts:
            if not c.samples_per_epoch:
                raise ValueError(
                    f"source {s.name}: {counts.count(None)} remote shard(s) without a sample count "
                    f"(e.g. {urls[counts.index(None)]}); give samples_per_epoch (the stage's samples "
                    "per epoch) or an index JSON (a builder's *-index.json) as the source"
                )
            counts = None  # whole-shard round robin, epoch length from samples_per_epoch
        if counts is None and not c.data.resampled:
            warn_if_few_shards(urls, c.world_size, c.workers_for_split, s.name)
        return counts

    # ---- stages -------------------------------------------------------------------------------------------------
    def quota(self, worker: int, nw: int) -> int:
        """Records worker w of any rank takes per epoch."""
        return split_batches(self.batches_per_rank, nw, worker) * self.cfg.batch_size

    def _slot_range(self, worker: int, nw: int) -> tuple[int, int, int]:
        """(start, end, span): this slot's positions of the epoch's global sequence of `span` records."""
        c = self.cfg
        start = c.rank * self.batches_per_rank * c.batch_size + sum(self.quota(w, nw) for w in range(worker))
        return start, start + self.quota(worker, nw), self.batches_per_rank * c.batch_size * c.world_size

    def pieces(self, i: int, worker: int, nw: int) -> list[Piece]:
        """This slot's first pass over source i this epoch."""
        c, urls, counts = self.cfg, self.urls[i], self.counts[i]
        if counts is None:
            a = assign_shards(urls, c.seed, self.epoch, c.rank, c.world_size, worker, nw, c.data.shuffle_shards, salt=i)
            return [Piece(u, stride=a.sample_stride, offset=a.sample_offset) for u in a.shards]
        if self.mix is not None:  # several: this slot's run of source i's own sequence (pipeline.data.mix)
            k = slot_range(self.mix, self.epoch_start, self.plan(nw)[1], c.rank, worker, i)
            return source_pieces(urls, counts, c.seed, c.data.shuffle_shards, i, k)
        start, end, span = self._slot_range(worker, nw)
        order = epoch_order(urls, c.seed, self.epoch, c.data.shuffle_shards, salt=i)
        # One source: the epoch's positions are the source's own (wrapping when samples_per_epoch exceeds it).
        return slot_pieces(urls, counts, order, start, end, sum(counts), epoch_end=span)

    @property
    def epoch_start(self) -> int:
        """Absolute position (over the stage's global sample sequence) where this epoch starts."""
        return self.epoch * self.batches_per_rank * self.cfg.world_size * self.cfg.batch_size

    def plan(self, nw: int) -> tuple:
        """The mix's layout of this epoch: (ids (batches, world, batch_size), quota (world, nw, sources))."""
        if self._plan is None or self._plan[:2] != (self.epoch, nw):
            c = self.cfg
            self._plan = (
                self.epoch,
                nw,
                *slot_plan(self.mix, self.epoch_start, self.batches_per_rank, c.world_size, c.batch_size, nw),
            )
        return self._plan[2:]

    def _passes(self, i: int, worker: int, nw: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Infinite record stream of source i for this slot: shuffled passes over its pieces."""
        c, task = self.cfg, self.cfg.sources[i].task
        rng = random.Random(f"shuffle/{c.seed}/{self.epoch}/{c.rank}/{worker}/{i}")
        if c.data.resampled:
            shards = resampled_shards(self.urls[i], c.seed, self.epoch, c.rank, worker, salt=i)
            yield from _tagged(
                _shuffle((r for u in shards for r in read_piece(Piece(u), counter)), c.data.shuffle_buffer, rng),
                task,
                i,
            )
            return
        pieces = self.pieces(i, worker, nw)
        fallback = False
        for n_pass in itertools.count():
            got = [0]
            records = _counting((r for p in pieces for r in read_piece(p, counter, count=n_pass == 0)), got)
            yield from _tagged(_shuffle(records, c.data.shuffle_buffer, rng), task, i)
            if got[0] == 0 and fallback:
                raise RuntimeError(
                    f"source {c.sources[i].name}: no shard gave a readable sample this epoch "
                    f"(rank {c.rank} worker {worker}); see the skip log above"
                )
            if got[0] == 0:  # none of this slot's shards was readable: fill the quota from the others'
                fallback, pieces = True, [Piece(u) for u in self.urls[i]]
                log.warning(
                    "source %s: rank %d worker %d read nothing from its shards; reading the other "
                    "slots' shards to fill its quota",
                    c.sources[i].name,
                    c.rank,
                    worker,
                )
            # else: the quota is not met yet (shards gave fewer records than counted): the same share again

    def _mixed(self, worker: int, nw: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        streams = [self._passes(i, worker, nw, counter) for i in range(len(self.urls))]
        if len(streams) == 1:
            yield from streams[0]
            return
        # the schedule's source for each row of this slot's batches, in the order the slot yields them
        ids = self.plan(nw)[0][worker::nw, self.cfg.rank].reshape(-1)
        for i in ids.tolist():
            yield next(streams[i])

    def stages(self, worker: int, nw: int, counter: SkipCounter) -> list:
        """The pipeline as one list of stages; each takes the previous iterator."""
        B = self.cfg.batch_size
        quota = split_batches(self.batches_per_rank, nw, worker)
        skip = min(split_batches(self.start_batch, nw, worker), quota)
        return [
            lambda _: self._mixed(worker, nw, counter),
            lambda it: itertools.islice(it, skip * B, quota * B),  # resume: drop whole batches before decoding
            lambda it: _grouped(it, B),
            lambda it: (self._finish(self.collate(g, counter), worker, counter) for g in it),
        ]

    def _finish(self, batch: Batch, worker: int, counter: SkipCounter) -> tuple[Batch, tuple]:
        """The batch with what the main process's counters need from this worker (its skips, the shards read)."""
        return batch, (worker, dict(counter.counts), counter.take_shards())

    def __iter__(self) -> Iterator[tuple[Batch, tuple]]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader always asks worker 0 first; after resuming at batch n the next batch belongs to logical
        # worker n % nw, so physical worker w plays logical worker (w + n) % nw (its shards, rng, quota, skip).
        worker = (worker + self.start_batch) % nw
        if nw != self.cfg.workers_for_split:
            raise RuntimeError(
                f"dataset built for {self.cfg.workers_for_split} workers runs under {nw}; iterate it through PillLoader"
            )
        counter = SkipCounter(self.cfg.data.log_skips)
        it: Any = None
        for stage in self.stages(worker, nw, counter):
            it = stage(it)
        yield from it


def probe_readable(urls: list[str]) -> bool:
    """Whether any shard yields a usable record (stops at the first that does; quiet: the workers count)."""
    quiet = SkipCounter(log_first=0)
    for u in urls:
        for _ in parse_json(iter_tar(u, quiet), quiet):
            return True
    return False


def _shuffle(src: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Buffer shuffle over a finite stream, drained at its end."""
    if size <= 1:
        yield from src
        return
    buf: list[dict[str, Any]] = []
    for r in src:
        buf.append(r)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _counting(it: Iterator[dict[str, Any]], got: list[int]) -> Iterator[dict[str, Any]]:
    for r in it:
        got[0] += 1
        yield r


def _tagged(it: Iterator[dict[str, Any]], task: str, source: int) -> Iterator[dict[str, Any]]:
    for r in it:
        r["__task__"] = task
        r["__source__"] = source  # the row's Batch.source (mixed stages: a loss or a metric per source)
        yield r


def _grouped(it: Iterator, n: int) -> Iterator[list]:
    while True:
        g = list(itertools.islice(it, n))
        if not g:
            return
        yield g


def _identity(x: Any) -> Any:
    return x


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SIGTERM / SIGUSR1 are the main process's to act on (checkpoint, exit 99).

    `kill -- -PGID`, `timeout`, DeepSpeed's launcher and Slurm's step teardown signal every process of the job,
    workers included; a worker that dies of it makes the DataLoader raise in the main process before it can
    checkpoint. The workers still end with the main process: the DataLoader shuts them down, and they exit by
    themselves when it dies (torch's manager watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class PillLoader:
    """Iterable over one epoch of batches per `iter()`; knows its position for checkpoints.

    state_dict() -> {"epoch", "batch", ...}: `batch` = batches consumed in `epoch`. load_state_dict() makes the next
    iteration continue exactly there (same config, world size and num_workers required).
    """

    def __init__(
        self,
        cfg: LoaderSpec,
        tokenizer: Any,
        start_epoch: int = 0,
        start_batch: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        with_meta: bool = False,
    ):
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

    def source_progress(self, pending: int = 0) -> dict[str, tuple[int, float | None]]:
        """Per source name: (samples read so far in the stage, over all ranks, and how many of the source's own
        epochs that is; None when its size is unknown), `pending` of the batches handed out not counted (held back,
        not trained on yet). One source: the loader's position."""
        ds, c = self.dataset, self.cfg
        pos = max(0, self.epoch * len(self) + self.batch - pending) * c.world_size * c.batch_size
        read = ds.mix.before(pos).tolist() if ds.mix is not None else [pos]
        return {s.name: (int(k), k / sum(n) if n else None) for s, k, n in zip(c.sources, read, ds.counts)}

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
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "num_workers": c.workers_for_split,
            "world_size": c.world_size,
            "rank": c.rank,
            "batches_per_epoch": len(self),
            "sources": describe_sources(c.sources),
            "global_batch": c.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.cfg
        check_same_mix(state.get("sources"), describe_sources(c.sources), state.get("global_batch"), c.global_batch)
        for k, mine in (
            ("seed", c.seed),
            ("batch_size", c.batch_size),
            ("num_workers", c.workers_for_split),
            ("world_size", c.world_size),
            ("batches_per_epoch", len(self)),
        ):
            if k in state and state[k] != mine:
                # Still resumable, but not to the same sample sequence: say so instead of pretending.
                log.warning("data resume: %s was %s, now %s; the sample order after resume differs", k, state[k], mine)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
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
        if nw > 0:
            kwargs["worker_init_fn"] = ignore_stop_signals
        dl = DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity, pin_memory=self.pin_memory, **kwargs)
        for b, (worker, skipped, shards) in dl:
            self._skips_now[worker] = skipped
            self.shards_read.extend(shards)
            self.batch += 1
            yield b
        for snap in self._skips_now.values():
            self._skips_done.update(snap)
        self._skips_now = {}
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0


def build_loader(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    sources: list[SourceConfig],
    batch_size: int,
    num_query_tokens: int,
    seed: int = 0,
    samples_per_epoch: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    global_batch: int | None = None,
    start_epoch: int = 0,
    start_batch: int = 0,
    with_meta: bool = False,
    **kwargs: Any,
) -> PillLoader:
    """The trainer's entry point: `cfg` is the `data:` section, the rest is per stage / per rank.

    rank / world_size None: $RANK / $WORLD_SIZE. global_batch: samples per optimizer step over all ranks (several
    sources are mixed exactly per global batch; None: batch_size x world_size). `start_*` (or load_state_dict)
    resume mid-epoch. with_meta: batches also carry `meta` (key, shard, task and json of each sample; for tests
    and debugging, not needed to train)."""
    spec = LoaderSpec(
        cfg, sources, batch_size, num_query_tokens, seed, samples_per_epoch, rank, world_size, global_batch
    )
    return PillLoader(spec, tokenizer, start_epoch=start_epoch, start_batch=start_batch, with_meta=with_meta, **kwargs)
