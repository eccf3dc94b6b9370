"""Stage: shard urls -> raw records `{"__key__", "__shard__", ext: bytes, "json": dict}`.

Bad data never stops training: an unreadable or truncated tar, a record without or with invalid JSON are skipped,
counted by reason in a `SkipCounter` and logged with shard and key (the first `log_first` per reason).
The tar is read as one stream (no per-sample file opens); grouping follows webdataset's key rule.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.data.shardlists import split_member

log = logging.getLogger(__name__)

SKIP_REASONS = (
    # shards and records
    "unreadable_shard",  # cannot be opened: missing file, refused connection, 404, failing pipe
    "bad_tar",  # not a tar, or the stream broke mid-file (the records complete before the break are kept)
    "missing_json", "bad_json",
    # prompt
    "missing_field", "bad_choices", "empty_answer", "bad_conversation", "bad_task",
    # visual input
    "missing_image", "undecodable_image", "unsupported_image", "image_count_mismatch", "bad_features",
    # batch
    "too_long", "empty_batch",
)
"""Every reason the loader counts a skip under (the trainer sums counters over ranks in this order)."""


class SkipCounter:
    """Per-worker counts of skipped inputs by reason, plus the shards opened since the last batch."""

    def __init__(self, log_first: int = 20):
        self.counts: Counter[str] = Counter()
        self.log_first = log_first
        self.shards_opened: list[str] = []

    def skip(self, reason: str, shard: str, key: str = "", detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first:
            log.warning("data: skipped (%s) shard=%s key=%s %s%s", reason, shard, key, detail,
                        " [further skips of this reason are only counted]" if n == self.log_first else "")

    def take_shards(self) -> list[str]:
        out, self.shards_opened = self.shards_opened, []
        return out


def _open(url: str):
    if url.startswith("pipe:") or "://" in url:
        from webdataset.gopen import gopen  # pipes, http(s), object stores: webdataset's opener

        return gopen(url, "rb")
    return open(url, "rb")


def iter_tar(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Yield the records of one shard; a read error ends the shard (what was complete before it is kept)."""
    counter.shards_opened.append(url)
    try:
        stream = _open(url)
    except OSError as e:
        counter.skip("unreadable_shard", url, detail=f"{type(e).__name__}: {e}")
        return
    cur: dict[str, Any] | None = None
    with stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = split_member(m.name)
                    if not ext:
                        continue
                    if cur is not None and cur["__key__"] != key:  # before reading: a read error keeps cur
                        yield cur
                        cur = None
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                    if cur is None:
                        cur = {"__key__": key, "__shard__": url}
                    cur[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            # The record being read when the stream broke is incomplete: drop it, keep the complete ones.
            counter.skip("bad_tar", url, cur["__key__"] if cur else "", f"{type(e).__name__}: {e}")
            return
    if cur is not None:
        yield cur


def parse_json(records: Iterable[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Decode `{key}.json` (cheap, before batching, so batch boundaries do not depend on image decoding)."""
    for r in records:
        raw = r.get("json")
        if raw is None:
            counter.skip("missing_json", r["__shard__"], r["__key__"])
            continue
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            counter.skip("bad_json", r["__shard__"], r["__key__"], f"{type(e).__name__}: {e}")
            continue
        r["json"] = meta
        yield r
