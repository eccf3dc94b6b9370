"""Shard lists: expansion, sample counts, and the per-epoch assignment of shards to (rank, worker) slots.

Why not webdataset's splitters: `single_node_only` (the default nodesplitter) raises as soon as WORLD_SIZE > 1, and
`split_by_node`/`split_by_worker` silently give empty workers when there are fewer shards than slots. Here the
assignment is one pure function of (shards, seed, epoch, rank, world_size, worker, num_workers), so every rank can
compute every other rank's share (tests check no overlap and no loss), and the fallback for too few shards is explicit.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

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
                idx = _read_json(u)
                if idx is None:
                    raise FileNotFoundError(f"shard index {u} not found or not valid JSON")
                out.extend(os.path.join(os.path.dirname(u), sh["file"]) for sh in idx["shards"] if sh)
            else:
                out.append(u)
    if not out:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return out


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard: the builders' `*-index.json` next to it, else img2dataset's `{shard}_stats.json`,
    else a scan of the tar headers (slow for remote/huge sets: write an index)."""
    indexes: dict[str, dict[str, int]] = {}  # dir -> {file: samples}, read once per call
    out = []
    for url in urls:
        d, base = os.path.split(url)
        if d not in indexes:
            indexes[d] = {}
            for ipath in sorted(glob.glob(os.path.join(d or ".", "*-index.json"))):
                idx = _read_json(ipath) or {}
                indexes[d].update({s["file"]: s["samples"] for s in idx.get("shards", []) if s})
        if base in indexes[d]:
            out.append(int(indexes[d][base]))
            continue
        stats = _read_json(url[: -len(".tar")] + "_stats.json") if url.endswith(".tar") else None
        out.append(int(stats["successes"]) if stats and "successes" in stats else scan_tar_count(url))
    return out


def scan_tar_count(url: str) -> int:
    """Distinct keys in a tar (headers only); 0 when unreadable (the reader will count the error)."""
    keys = set()
    try:
        with tarfile.open(url, "r") as tar:
            for m in tar:
                if m.isfile():
                    keys.add(split_member(m.name)[0])
    except (OSError, tarfile.TarError, EOFError):
        log.warning("cannot scan %s for its sample count; counting it as 0", url)
    return len(keys)


def split_member(name: str) -> tuple[str, str]:
    """`dir/abc.feat.npy` -> ('dir/abc', 'feat.npy'): webdataset's rule, the key ends at the basename's first dot."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    k, ext = base.split(".", 1)
    return (os.path.join(d, k) if d else k), ext.lower()


@dataclass(frozen=True)
class Assignment:
    shards: list[str]
    """shards this slot reads, in order"""
    sample_stride: int
    """1: every sample of those shards; n > 1: the fallback for too few shards, keep sample i where i % n == offset"""
    sample_offset: int


def assign_shards(urls: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int, shuffle: bool = True, salt: int = 0) -> Assignment:
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
        log.warning("%s: %d shard(s) < %d ranks x %d workers: splitting by sample instead of by shard "
                    "(each worker reads every shard); write more, smaller shards to avoid the extra reading",
                    name, len(urls), world_size, num_workers)
        return True
    return False


def resampled_shards(urls: list[str], seed: int, epoch: int, rank: int, worker: int, salt: int = 0):
    """Infinite stream of shards drawn with replacement; the rng depends only on (seed, epoch, rank, worker)."""
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}/{worker}/{salt}")
    while True:
        yield rng.choice(urls)


def check_exists(urls: list[str], name: str) -> None:
    """Local shards that do not exist are a configuration error, caught before training starts."""
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"source {name}: none of its {len(urls)} shard(s) exist, e.g. {missing[0]}")
    if missing:
        log.warning("source %s: %d of %d shard(s) missing (e.g. %s); they will be skipped and counted",
                    name, len(missing), len(urls), missing[0])
