"""Shard lists: expansion, sample counts, and the per-epoch assignment of samples to (rank, worker) slots.

Why not webdataset's splitters: `single_node_only` (the default nodesplitter) raises as soon as WORLD_SIZE > 1, and
`split_by_node`/`split_by_worker` silently give empty workers when there are fewer shards than slots, and neither
can make an epoch an exact permutation when shards do not divide evenly over the slots. Here, with the sample
counts known (builder index, img2dataset stats or a tar scan), an epoch is one global sequence: the shards in a
per-epoch shuffled order, concatenated; slot s takes the contiguous positions [start_s, start_s + quota_s) of it
(`slot_pieces`), so the slots' shares are disjoint and, together, exactly the epoch. A slot reads whole shards
except at the two ends of its range. Without counts (remote shards, no index, samples_per_epoch given) the old
whole-shard round robin is used (`assign_shards`). Both are pure functions of (seed, epoch, rank, worker, ...), so
every rank can compute every other rank's share (tested).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from pipeline.data.tarstream import TarError, iter_members

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, lists, directories (every `*.tar` in it) and builder index files -> sorted-as-given urls."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        for u in braceexpand.braceexpand(str(s)):
            if os.path.isdir(u):
                found = sorted(glob.glob(os.path.join(u, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"shard directory {u} holds no *.tar")
                out.extend(found)
            elif u.endswith("-index.json"):
                idx = read_index(u)
                out.extend(_join(u, sh["file"]) for sh in idx["shards"] if sh)
            else:
                out.append(u)
    if not out:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return out


def index_urls(spec: str | list[str]) -> list[str]:
    """The builder index files named in a shard spec (they carry the counts of remote shards)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [u for s in specs for u in braceexpand.braceexpand(str(s)) if u.endswith("-index.json")]


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _join(index_url: str, file: str) -> str:
    return (
        index_url.rsplit("/", 1)[0] + "/" + file
        if is_remote(index_url)
        else os.path.join(os.path.dirname(index_url), file)
    )


def _read_json(path: str) -> dict | None:
    try:
        if is_remote(path):
            from webdataset.gopen import gopen  # remote urls only: local shards never import webdataset

            with gopen(path, "rb") as f:
                return json.loads(f.read())
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_index(url: str) -> dict:
    """A builder's `*-index.json` (local path or URL)."""
    idx = _read_json(url)
    if idx is None or not isinstance(idx.get("shards"), list):
        raise FileNotFoundError(f"shard index {url} not found or not valid JSON with a 'shards' list")
    return idx


def shard_counts(urls: list[str], index_urls: list[str] = ()) -> list[int | None]:
    """Samples per shard: a builder's index (given, or `*-index.json` next to a local shard), else img2dataset's
    `{shard}_stats.json`, else a scan of a local tar; None for a remote shard no index covers."""
    known: dict[str, int] = {}
    for iu in index_urls:
        known.update({_join(iu, s["file"]): int(s["samples"]) for s in read_index(iu)["shards"] if s})
    local_dirs: dict[str, dict[str, int]] = {}  # dir -> {file: samples}, read once per call
    out: list[int | None] = []
    for url in urls:
        if url in known:
            out.append(known[url])
            continue
        if is_remote(url):
            out.append(None)
            continue
        d, base = os.path.split(url)
        if d not in local_dirs:
            local_dirs[d] = {}
            for ipath in sorted(glob.glob(os.path.join(d or ".", "*-index.json"))):
                idx = _read_json(ipath) or {}
                local_dirs[d].update({s["file"]: s["samples"] for s in idx.get("shards", []) if s})
        if base in local_dirs[d]:
            out.append(int(local_dirs[d][base]))
            continue
        stats = _read_json(url[: -len(".tar")] + "_stats.json") if url.endswith(".tar") else None
        out.append(int(stats["successes"]) if stats and "successes" in stats else scan_tar_count(url))
    return out


def scan_tar_count(url: str) -> int:
    """Usable samples in a local tar: keys with a member extension and a json object (the records the reader
    yields); 0 when unreadable (the reader will count the error). Reads headers and json members only."""
    keys: dict[str, bool] = {}
    try:
        with open(url, "rb") as f:
            for m in iter_members(f, seekable=True):
                key, ext = split_member(m.name)
                if not ext:
                    continue
                keys.setdefault(key, False)
                if ext == "json":
                    try:
                        keys[key] = isinstance(json.loads(m.read()), dict)
                    except ValueError:
                        keys[key] = False
    except (OSError, TarError) as e:
        # The reader trains on the records complete before the damage: count those, and say so.
        log.warning(
            "%s is damaged or unreadable (%s: %s); counting the %d sample(s) before the damage, which are trained",
            url,
            type(e).__name__,
            e,
            sum(keys.values()),
        )
    return sum(keys.values())


def split_member(name: str) -> tuple[str, str]:
    """`dir/abc.feat.npy` -> ('dir/abc', 'feat.npy'): webdataset's rule, the key ends at the basename's first dot."""
    d, slash, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return d + slash + k, ext.lower()


@dataclass(frozen=True)
class Piece:
    """What one slot reads of one shard: usable-record positions [lo, hi) (hi None: to the end), or, without
    counts and with fewer shards than slots, every stride-th record from offset."""

    url: str
    lo: int = 0
    hi: int | None = None
    total: int | None = None
    """the shard's sample count, when known"""
    stride: int = 1
    offset: int = 0

    @property
    def owns_head(self) -> bool:
        """Shard-level failures (unreadable, not a tar) are counted by the piece that starts the shard."""
        return self.lo == 0 and self.offset == 0


def epoch_order(urls: list[str], seed: int, epoch: int, shuffle: bool, salt: int = 0) -> list[int]:
    """Shard indices in this epoch's order; identical on every rank (same seed/epoch)."""
    order = list(range(len(urls)))
    if shuffle:
        random.Random(f"{seed}/{epoch}/{salt}").shuffle(order)
    return order


def range_pieces(
    urls: list[str],
    counts: list[int],
    start: int,
    end: int,
    epoch_end: int | None = None,
) -> list[Piece]:
    """Positions [start, end) of the concatenation of the shards (in the given order), wrapping past the end.

    A shard counted empty (unscannable, or every record bad) holds no position; it still goes, as an empty
    piece, to the slot whose range holds its start (clamped to epoch_end - 1), so its damage is counted once."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    n = cum[-1]
    last = (epoch_end if epoch_end is not None else n) - 1
    out: list[Piece] = []
    pos = start
    while pos < end and n > 0:
        p = pos % n
        i = bisect_right(cum, p) - 1  # the last shard starting at or before p (never an empty one)
        lo = p - cum[i]
        take = min(counts[i] - lo, end - pos)
        out.append(Piece(urls[i], lo, lo + take, counts[i]))
        pos += take
    empty = [Piece(u, 0, 0, 0) for u, c, at in zip(urls, counts, cum) if c == 0 and start <= min(at, last) < end]
    return empty + out


def slot_pieces(
    urls: list[str], counts: list[int], order: list[int], start: int, end: int, span: int, epoch_end: int | None = None
) -> list[Piece]:
    """This slot's pieces of one source. [start, end) is the slot's share of the epoch's `span` positions; a
    source of N samples maps it onto [start*N/span, end*N/span) (span == N: the positions themselves).
    epoch_end: where the epoch's positions end in this source (default N)."""
    n = sum(counts)
    lo, hi = (start, end) if span == n else (start * n // span, end * n // span)
    return range_pieces([urls[i] for i in order], [counts[i] for i in order], lo, hi, epoch_end)


@dataclass(frozen=True)
class Assignment:
    shards: list[str]
    """shards this slot reads, in order"""
    sample_stride: int
    """1: every sample of those shards; n > 1: the fallback for too few shards, keep sample i where i % n == offset"""
    sample_offset: int


def assign_shards(
    urls: list[str],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    shuffle: bool = True,
    salt: int = 0,
) -> Assignment:
    """This slot's share of one epoch. Every rank shuffles identically (same seed/epoch), so shares are disjoint."""
    order = list(urls)
    if shuffle:
        random.Random(f"{seed}/{epoch}/{salt}").shuffle(order)
    slots, slot = world_size * num_workers, rank * num_workers + worker
    if len(order) >= slots:
        return Assignment(order[slot::slots], 1, 0)
    # Too few shards for rank x worker: every slot reads all shards and keeps every slots-th sample. Costs
    # reading amplification (fine for the small sets where it happens) but no slot is ever empty.
    return Assignment(order, slots, slot)


def warn_if_few_shards(urls: list[str], world_size: int, num_workers: int, name: str) -> bool:
    slots = world_size * num_workers
    if len(urls) < slots:
        log.warning(
            "%s: %d shard(s) < %d ranks x %d workers: splitting by sample instead of by shard "
            "(each worker reads every shard); write more, smaller shards to avoid the extra reading",
            name,
            len(urls),
            world_size,
            num_workers,
        )
        return True
    return False


def resampled_shards(urls: list[str], seed: int, epoch: int, rank: int, worker: int, salt: int = 0):
    """Infinite stream of shards drawn with replacement; the rng depends only on (seed, epoch, rank, worker)."""
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}/{worker}/{salt}")
    while True:
        yield rng.choice(urls)


def check_exists(urls: list[str], name: str) -> None:
    """Local shards that do not exist are a configuration error, caught before training starts."""
    missing = [u for u in urls if not is_remote(u) and not Path(u).exists()]
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"source {name}: none of its {len(urls)} shard(s) exist, e.g. {missing[0]}")
    if missing:
        log.warning(
            "source %s: %d of %d shard(s) missing (e.g. %s); they will be skipped and counted",
            name,
            len(missing),
            len(urls),
            missing[0],
        )
