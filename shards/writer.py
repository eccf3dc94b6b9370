"""Common WebDataset shard writer used by every builder in `shards/`.

Layout (img2dataset-compatible): `{name}-{000000..N}.tar`, each holding `{key}.jpg|png` (or `{key}.feat.npy`),
`{key}.json` and optionally `{key}.txt`, plus `{name}-index.json` with samples per shard and skip counts.

Design choices:
- The shard plan (which items go to which shard) is computed up front from cheap size estimates, so shard i always
  holds the same items; that makes parallel writing and resume trivial (a shard is redone or kept as a whole).
- A shard is written to `{final}.tmp` and renamed when closed: a crash never leaves a half shard under its final name.
- The index is rewritten (atomically) after every finished shard; resume keeps a shard when its index entry, plan
  hash and file size all match.
- Tar members get fixed mtime/uid/gid so the same input gives byte-identical shards (the demo set relies on it);
  the tar primitive itself is pipeline.data.tarwrite (the loader bench writes tars too, and pipeline never imports
  shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.tarwrite import Sample, write_tar  # re-exported: the builders' API

log = logging.getLogger(__name__)

INDEX_FORMAT = "pill-shards/1"
TAR_OVERHEAD = 1536  # header + padding per member, enough for an estimate
MAX_SKIP_EXAMPLES = 20  # per reason, kept in the index so a user can look at them


class SkipSample(Exception):
    """Raised by a builder's `make_sample` for an input that must be skipped; `reason` becomes a counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class WriterConfig:
    out_dir: Path
    name: str
    max_samples: int = 1000
    """at most this many samples per shard"""
    max_size: int = 1 << 30
    """at most about this many bytes per shard (estimated from the inputs; skipped samples only make it smaller)"""
    workers: int = 1
    """parallel shard-writing processes"""
    resume: bool = True
    """keep shards the index lists as complete (same plan, same size); False rewrites everything"""
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    """extra fields stored in the index (builder name, content kind, source paths)"""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.name or "/" in self.name or "." in self.name:
            raise ValueError(f"shard name {self.name!r} must be non-empty and contain neither '/' nor '.'")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def sanitize_key(key: str) -> str:
    """WebDataset splits a member name at the first dot of its basename, so keys must hold no '.' nor '/'."""
    return str(key).replace("/", "_").replace(".", "_").replace(" ", "_")


def index_path(out_dir: Path | str, name: str) -> Path:
    return Path(out_dir) / f"{name}-index.json"


def shard_name(name: str, i: int) -> str:
    return f"{name}-{i:06d}.tar"


def plan_shards(sizes: Sequence[int], max_samples: int, max_size: int) -> list[tuple[int, int]]:
    """Greedy split of items [0, n) into contiguous (start, end) ranges bounded by count and estimated bytes."""
    plan: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, size in enumerate(sizes):
        n = i - start
        if n > 0 and (n >= max_samples or acc + size > max_size):
            plan.append((start, i))
            start, acc = i, 0
        acc += size
    if start < len(sizes):
        plan.append((start, len(sizes)))
    return plan


def _plan_hash(keys: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


def _write_one_shard(job: tuple[int, Path, list[Any], Callable[[Any], Sample]]) -> dict[str, Any]:
    """Worker body: materialise the items of one shard, skipping (and counting) the bad ones."""
    shard_idx, path, items, make_sample = job
    samples: list[Sample] = []
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in items:
        try:
            s = make_sample(item)
            if s.key in seen:
                raise SkipSample("duplicate_key", s.key)
            seen.add(s.key)
            samples.append(s)
        except SkipSample as e:
            skipped[e.reason] += 1
            examples.setdefault(e.reason, [])
            if len(examples[e.reason]) < MAX_SKIP_EXAMPLES:
                examples[e.reason].append(e.detail)
    size = write_tar(path, samples)
    return {
        "index": shard_idx,
        "file": path.name,
        "samples": len(samples),
        "bytes": size,
        "skipped": dict(skipped),
        "skip_examples": examples,
    }


def _load_index(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        idx = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("index %s is not valid JSON; rebuilding every shard", path)
        return None
    if idx.get("format") != INDEX_FORMAT:
        return None
    return idx


def _save_index(path: Path, index: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _finalise(index: dict[str, Any]) -> None:
    shards = [s for s in index["shards"] if s is not None]
    index["total_samples"] = sum(s["samples"] for s in shards)
    skipped: Counter[str] = Counter()
    for s in shards:
        skipped.update(s["skipped"])
    index["skipped"] = dict(skipped)
    index["complete"] = all(s is not None for s in index["shards"])


def _pending_jobs(items, keys, plan, make_sample, cfg: WriterConfig, old_by_file: dict, index: dict) -> list:
    """Shards still to write; a shard already complete from the same plan goes straight into `index`."""
    jobs = []
    for i, (a, b) in enumerate(plan):
        path = cfg.out_dir / shard_name(cfg.name, i)
        h = _plan_hash(keys[a:b])
        prev = old_by_file.get(path.name)
        if prev and prev.get("plan") == h and path.exists() and path.stat().st_size == prev["bytes"]:
            index["shards"][i] = prev
            continue
        jobs.append((i, path, list(items[a:b]), make_sample, h))
    return jobs


def _remove_stale_shards(cfg: WriterConfig, n_planned: int) -> None:
    """Shards from an earlier, longer plan would otherwise be picked up by a `*.tar` glob."""
    planned = {shard_name(cfg.name, i) for i in range(n_planned)}
    pattern = re.compile(re.escape(cfg.name) + r"-\d{6}\.tar")
    for p in cfg.out_dir.glob(f"{cfg.name}-*.tar"):
        if pattern.fullmatch(p.name) and p.name not in planned:
            log.warning("removing stale shard %s (not in the current plan)", p)
            p.unlink()


def write_shards(
    items: Sequence[Any],
    keys: Sequence[str],
    sizes: Sequence[int],
    make_sample: Callable[[Any], Sample],
    cfg: WriterConfig,
) -> dict[str, Any]:
    """Write `items` as shards; `keys`/`sizes` are cheap per-item key and byte estimates used for the plan.

    `make_sample` runs in worker processes (pass a module-level function or functools.partial of one); it returns a
    Sample or raises SkipSample. Returns the index dict (also written to `{out_dir}/{name}-index.json`).
    """
    if not (len(items) == len(keys) == len(sizes)):
        raise ValueError(f"items/keys/sizes lengths differ: {len(items)}, {len(keys)}, {len(sizes)}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(sizes, cfg.max_samples, cfg.max_size)
    ipath = index_path(cfg.out_dir, cfg.name)
    old = _load_index(ipath) if cfg.resume else None
    old_by_file = {s["file"]: s for s in (old or {}).get("shards", []) if s}
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "name": cfg.name,
        "max_samples": cfg.max_samples,
        "max_size": cfg.max_size,
        "shards": [None] * len(plan),
        **cfg.meta,
    }
    jobs = _pending_jobs(items, keys, plan, make_sample, cfg, old_by_file, index)
    _remove_stale_shards(cfg, len(plan))
    n_kept = len(plan) - len(jobs)
    if n_kept:
        log.info("resume: keeping %d complete shard(s), writing %d", n_kept, len(jobs))
    bar = tqdm(total=sum(len(j[2]) for j in jobs), unit="sample", desc=cfg.name, disable=not cfg.progress)

    def done(result: dict[str, Any], h: str, n_items: int) -> None:
        result["plan"] = h
        result.pop("index")
        index["shards"][int(result["file"].rsplit("-", 1)[1].split(".")[0])] = result
        _finalise(index)
        _save_index(ipath, index)
        bar.update(n_items)

    if cfg.workers == 1 or len(jobs) <= 1:
        for i, path, its, fn, h in jobs:
            done(_write_one_shard((i, path, its, fn)), h, len(its))
    else:
        # fork: builders' make_sample closures over big dicts need not be pickled twice, and it is fast to start.
        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as ex:
            futs = {ex.submit(_write_one_shard, (i, path, its, fn)): (h, len(its)) for i, path, its, fn, h in jobs}
            for fut in futs:  # submission order: the index grows in shard order, the bar still moves
                h, n = futs[fut]
                done(fut.result(), h, n)
    bar.close()
    _finalise(index)
    _save_index(ipath, index)
    if index["skipped"]:
        log.warning("%s: skipped %s", cfg.name, index["skipped"])
    return index


def summary(index: dict[str, Any]) -> str:
    """One human line per run: what was written and what was skipped, by reason."""
    sk = ", ".join(f"{k}={v}" for k, v in sorted(index["skipped"].items())) or "none"
    return f"{index['name']}: {len(index['shards'])} shard(s), {index['total_samples']} sample(s); skipped: {sk}"


def add_writer_args(parser: Any, default_max_samples: int = 1000) -> None:
    """The CLI flags every builder shares."""
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--name", default=None, help="shard name prefix (default: builder specific)")
    parser.add_argument("--max-samples", type=int, default=default_max_samples, help="samples per shard, at most")
    parser.add_argument("--max-size", type=float, default=1e9, help="bytes per shard, at most (estimate)")
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    parser.add_argument("--no-resume", action="store_true", help="rewrite shards even if the index lists them")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")


def writer_config(args: Any, name: str, meta: dict[str, Any]) -> WriterConfig:
    return WriterConfig(
        out_dir=args.out,
        name=args.name or name,
        max_samples=args.max_samples,
        max_size=int(args.max_size),
        workers=args.workers,
        resume=not args.no_resume,
        progress=not args.no_progress,
        meta=meta,
    )
