"""Mixed sources in a stage, exactly: which source fills each position of each global batch.

A stage with several sources (ScienceQA with images and text-only chat replay, say) is one sequence of global
batches of G samples (G = micro-batch x ranks x accumulation). `MixSchedule` decides, for every absolute position
of that sequence, the source whose next sample goes there:

- counts: global batch g holds c_i(g) samples of source i, with c_i(g) = floor(G w_i / W) or one more (largest
  remainder), the extra slots going to the sources furthest behind their ideal running total g G w_i / W, so the
  mix holds in every global batch (up to rounding) and the running totals never drift by a whole sample;
- places: the slots of a global batch are shuffled by (seed, g) and laid out by position: micro-step a, rank r,
  row j of a global batch are its positions a x world x B + r x B + j, so which rank and micro-batch a text-only
  row lands on is decided here, never by a worker's own random draw.

Everything is a pure function of (weights, G, seed, position): the same global batches for any world size (same
G) and any number of DataLoader workers, and every rank can compute every other rank's share. Each source then
reads its own sample sequence in order: source i's k-th slot of the stage takes its k-th sample, which is sample
k mod N_i of source epoch k // N_i (its own shard order per source epoch), so each source's epochs are exact and
counted on their own (`source_epochs`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np

from pipeline.data.shardlists import Piece, epoch_order, slot_pieces

log = logging.getLogger(__name__)


class MixChangedError(ValueError):
    """A checkpoint's data position was written for another mix of sources (names, weights, tasks or shards)."""


@dataclass(frozen=True)
class MixSpec:
    """What fixes the schedule (and so what a resume must find unchanged)."""

    weights: tuple[float, ...]
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        if not self.weights or not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"mix weights must be finite and > 0, got {list(self.weights)}")
        if self.global_batch < 1:
            raise ValueError(f"mix global batch must be >= 1, got {self.global_batch}")


class MixSchedule:
    """Source id of every absolute position of a stage's sample sequence (see the module docstring)."""

    def __init__(self, spec: MixSpec):
        self.spec = spec
        w = np.asarray(spec.weights, dtype=np.float64)
        self.share = spec.global_batch * w / w.sum()  # ideal samples per global batch, per source
        self.base = np.floor(self.share).astype(np.int64)
        self.extra = spec.global_batch - int(self.base.sum())  # slots left for the largest remainders
        self._cum = [np.zeros(len(w), dtype=np.int64)]  # _cum[g]: per-source totals of global batches < g

    @property
    def n_sources(self) -> int:
        return len(self.spec.weights)

    def _grow(self, g: int) -> None:
        """Totals known for every global batch < g."""
        while len(self._cum) <= g:
            n = len(self._cum)
            cum = self._cum[-1]
            behind = n * self.share - cum - self.base  # how far each source trails its ideal total after batch n
            counts = self.base.copy()
            counts[np.argsort(-behind, kind="stable")[: self.extra]] += 1
            self._cum.append(cum + counts)

    def counts(self, g: int) -> np.ndarray:
        """Samples of each source in global batch g."""
        self._grow(g + 1)
        return self._cum[g + 1] - self._cum[g]

    def batch(self, g: int) -> np.ndarray:
        """Source id of each of global batch g's G positions."""
        slots = [i for i, c in enumerate(self.counts(g).tolist()) for _ in range(c)]
        random.Random(f"mix/{self.spec.seed}/{g}").shuffle(slots)
        return np.asarray(slots, dtype=np.int64)

    def sources(self, start: int, end: int) -> np.ndarray:
        """Source id of every absolute position in [start, end)."""
        G = self.spec.global_batch
        if end <= start:
            return np.zeros(0, dtype=np.int64)
        g0, g1 = start // G, (end - 1) // G
        ids = np.concatenate([self.batch(g) for g in range(g0, g1 + 1)])
        return ids[start - g0 * G : end - g0 * G]

    def before(self, pos: int) -> np.ndarray:
        """Samples of each source at absolute positions < pos (how far each source's sequence has been read)."""
        G = self.spec.global_batch
        g = pos // G
        self._grow(g)
        part = np.bincount(self.batch(g)[: pos - g * G], minlength=self.n_sources) if pos % G else 0
        return self._cum[g] + part


def slot_plan(
    schedule: MixSchedule, epoch_start: int, batches: int, world: int, batch_size: int, nw: int
) -> tuple[np.ndarray, np.ndarray]:
    """One stage epoch's layout: rank r's local batch b holds the positions epoch_start + (b x world + r) x
    batch_size + [0, batch_size). Returns (ids, quota): ids (batches, world, batch_size) source per row, and
    quota (world, nw, n_sources): how many samples of each source each (rank, logical worker) slot reads (worker
    w reads local batches b with b % nw == w, the DataLoader's round robin)."""
    ids = schedule.sources(epoch_start, epoch_start + batches * world * batch_size).reshape(batches, world, batch_size)
    per_batch = np.stack([(ids == i).sum(-1) for i in range(schedule.n_sources)], -1)  # (batches, world, S)
    quota = np.zeros((world, nw, schedule.n_sources), dtype=np.int64)
    for w in range(nw):
        quota[:, w] = per_batch[w::nw].sum(0)
    return ids, quota


def slot_range(schedule: MixSchedule, epoch_start: int, quota: np.ndarray, rank: int, worker: int, i: int) -> range:
    """Source i's sample numbers (over the whole stage, across its own epochs) that slot (rank, worker) reads in
    this stage epoch: the slots take consecutive runs of the source's sequence, in (rank, worker) order."""
    flat = quota[:, :, i].reshape(-1)
    at = rank * quota.shape[1] + worker
    lo = int(schedule.before(epoch_start)[i]) + int(flat[:at].sum())
    return range(lo, lo + int(flat[at]))


def source_pieces(urls: list[str], counts: list[int], seed: int, shuffle: bool, salt: int, k: range) -> list[Piece]:
    """The pieces holding source sample numbers k of a source of N = sum(counts) samples: number n is sample
    n mod N of source epoch n // N, whose shard order is its own (seeded by the source epoch)."""
    n = sum(counts)
    out: list[Piece] = []
    pos = k.start
    while pos < k.stop and n > 0:
        epoch, lo = divmod(pos, n)
        hi = min(n, lo + k.stop - pos)
        order = epoch_order(urls, seed, epoch, shuffle, salt=salt)
        out += slot_pieces(urls, counts, order, lo, hi, n)
        pos += hi - lo
    return out


def describe_sources(sources: list) -> list[dict]:
    """The resume-relevant identity of a stage's sources (a list of pipeline.data.SourceConfig)."""
    return [
        {
            "name": s.name,
            "weight": float(s.weight),
            "task": s.task,
            "shards": [s.shards] if isinstance(s.shards, str) else list(s.shards),
        }
        for s in sources
    ]


def check_same_mix(saved: list[dict] | None, mine: list[dict], saved_gb: int | None, my_gb: int) -> None:
    """Raise MixChangedError naming what changed between a checkpoint's sources and this run's (None: a
    checkpoint from before sources were recorded, nothing to compare)."""
    if saved is None:
        return
    changes: list[str] = []
    names_then, names_now = [s["name"] for s in saved], [s["name"] for s in mine]
    if names_then != names_now:
        changes.append(f"sources {names_then} -> {names_now}")
    else:
        for then, now in zip(saved, mine):
            for key in ("weight", "task", "shards"):
                if then.get(key) != now[key]:
                    changes.append(f"source {now['name']}: {key} {then.get(key)!r} -> {now[key]!r}")
    if saved_gb is not None and len(mine) > 1 and saved_gb != my_gb:
        # Same mix, other global batches (e.g. another world size): each source resumes near where it was (within
        # one global batch's rounding), so a warning, not an error.
        log.warning("data resume: global batch %d -> %d; the mix's layout after resume differs", saved_gb, my_gb)
    if changes:
        raise MixChangedError(
            "the checkpoint's data position belongs to another mix of sources: "
            + "; ".join(changes)
            + ". Restore the stage's sources, or start the stage afresh (a new output_dir, or checkpoint.resume: "
            "never)"
        )
