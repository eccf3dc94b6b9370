"""Stage: shard urls -> raw records `{"__key__", "__shard__", ext: bytes, "json": dict}`.

Bad data never stops training: an unreadable or truncated tar (local, `pipe:` or `http(s)://`), a record without or
with invalid JSON are skipped, counted by reason in a `SkipCounter` and logged with shard and key (the first
`log_first` per reason). A tar is read as one stream (no per-sample file opens, tarstream.py); grouping follows
webdataset's key rule. Local files are seekable, so the members of records a slot does not take are skipped by
seeking (only their json is read).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.data.shardlists import Piece, is_remote, split_member
from pipeline.data.tarstream import Member, TarError, iter_members, read_at

log = logging.getLogger(__name__)

SKIP_REASONS = (
    # shards and records
    "unreadable_shard",  # cannot be opened: missing file, refused connection, 404, failing pipe
    "bad_tar",  # not a tar, or the stream broke mid-file (the records complete before the break are kept)
    "missing_json",
    "bad_json",
    # prompt
    "missing_field",
    "bad_choices",
    "empty_answer",
    "bad_conversation",
    "bad_task",
    # visual input
    "missing_image",
    "undecodable_image",
    "unsupported_image",
    "image_count_mismatch",
    "bad_features",
    "image_too_large",  # more than data.max_image_pixels in its header: refused before decoding
    # batch
    "too_long",
    "empty_batch",
)
"""Every reason the loader counts a skip under (the trainer sums counters over ranks in this order)."""
_PER_BATCH = ("empty_batch",)  # counted per occurrence; every other reason once per (shard, key) and epoch


class SkipCounter:
    """Per-worker, per-epoch counts of skipped inputs by reason, plus the shards opened since the last batch.

    A sample is counted once per epoch however often it is read (a slot that wraps over its shards reads it again),
    and only by the slot that owns it (`count=False` for reads of other slots' samples), so totals summed over
    workers and ranks are exact."""

    def __init__(self, log_first: int = 20):
        self.counts: Counter[str] = Counter()
        self.log_first = log_first
        self.shards_opened: list[str] = []
        self._seen: set[tuple[str, str, str]] = set()

    def skip(self, reason: str, shard: str, key: str = "", detail: str = "", count: bool = True) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        if not count:
            return
        if reason not in _PER_BATCH:
            if (reason, shard, key) in self._seen:
                return
            self._seen.add((reason, shard, key))
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first:
            log.warning(
                "data: skipped (%s) shard=%s key=%s %s%s",
                reason,
                shard,
                key,
                detail,
                " [further skips of this reason are only counted]" if n == self.log_first else "",
            )

    def truncated(self, source: int, answer_tokens: int, shard: str, key: str = "", detail: str = "") -> None:
        """A sample kept but cut to data.max_length: counted per source (`truncated/<i>`) with the answer tokens
        it lost (`truncated_answer_tokens/<i>`); once per (shard, key) and epoch, logged like a skip."""
        if ("truncated", shard, key) in self._seen:
            return
        self._seen.add(("truncated", shard, key))
        self.counts[f"truncated/{source}"] += 1
        self.counts[f"truncated_answer_tokens/{source}"] += answer_tokens
        n = sum(v for k, v in self.counts.items() if k.startswith("truncated/"))
        if n <= self.log_first:
            log.warning("data: truncated to max_length shard=%s key=%s %s", shard, key, detail)

    def take_shards(self) -> list[str]:
        out, self.shards_opened = self.shards_opened, []
        return out


def _open(url: str):
    if is_remote(url):
        from webdataset.gopen import gopen  # pipes, http(s), object stores: webdataset's opener

        return gopen(url, "rb")
    return open(url, "rb")


def iter_tar(url: str, counter: SkipCounter, count: bool = True, lazy: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the records of one shard; a read error ends the shard (what was complete before it is kept).

    Every failure, including the exit status a `pipe:`/curl stream reports when it is closed, is caught here:
    a shard can cost its samples, never the run. count=False: another slot owns this shard's failures.
    lazy (local files): only json members are read; the others stay `Member`s until `load_members` reads them
    (the records a slot does not take are seeked over)."""
    counter.shards_opened.append(url)
    try:
        stream = _open(url)
    except (OSError, ValueError) as e:  # missing file; webdataset raises ValueError for pipes it cannot start
        counter.skip("unreadable_shard", url, detail=f"{type(e).__name__}: {e}", count=count)
        return
    lazy = lazy and not is_remote(url)
    cur: dict[str, Any] | None = None
    started = closed = False

    def hand_over(rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        nonlocal closed  # a consumer that stops early closes us at this yield
        try:
            yield rec
        except GeneratorExit:
            closed = True
            raise

    try:
        with stream:
            for m in iter_members(stream, seekable=not is_remote(url)):
                started = True
                key, ext = split_member(m.name)
                if not ext:
                    continue
                if cur is not None and cur["__key__"] != key:  # before reading: a read error keeps cur
                    out, cur = cur, None
                    yield from hand_over(out)
                if cur is None:
                    cur = {"__key__": key, "__shard__": url, **({"__tar__": stream} if lazy else {})}
                cur[ext] = m if lazy and ext != "json" else m.read()
            if cur is not None:
                out, cur = cur, None
                yield from hand_over(out)
    except (TarError, EOFError, OSError, ValueError) as e:
        if closed:  # the consumer stopped early; closing a pipe then is not a data error
            return
        # The record being read when the stream broke is incomplete: drop it, keep the complete ones. A 404 or a
        # refused connection surfaces here too (the pipe's exit status), before any member.
        reason = "unreadable_shard" if not started and _never_opened(e) else "bad_tar"
        counter.skip(reason, url, cur["__key__"] if cur else "", f"{type(e).__name__}: {e}", count=count)


def _never_opened(e: Exception) -> bool:
    """A pipe that failed before any member: curl's HTTP error (22: 404, 403, ...), could not resolve / connect
    (6, 7), or a command's exit 1 (cat of a missing file)."""
    text = str(e)
    return any(f"exit {code} " in text for code in (1, 6, 7, 22))


def load_members(r: dict[str, Any]) -> dict[str, Any]:
    """Read the members a lazy reader left unread (call while the shard is still being iterated)."""
    f = r.pop("__tar__", None)
    if f is not None:
        for k, v in r.items():
            if isinstance(v, Member):
                r[k] = read_at(f, v)
    return r


def json_of(r: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
    """(meta, "", "") for a usable record, else (None, reason, detail)."""
    raw = r.get("json")
    if raw is None:
        return None, "missing_json", ""
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError(f"json is a {type(meta).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        return None, "bad_json", f"{type(e).__name__}: {e}"
    return meta, "", ""


def parse_json(records: Iterable[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Decode `{key}.json` (cheap, before batching, so batch boundaries do not depend on image decoding)."""
    for r in records:
        meta, reason, detail = json_of(r)
        if meta is None:
            counter.skip(reason, r["__shard__"], r["__key__"], detail)
            continue
        r["json"] = meta
        if _loaded(r, counter, True):
            yield r


def _loaded(r: dict[str, Any], counter: SkipCounter, count: bool) -> bool:
    """load_members, counting a member cut off by a truncated local file as bad_tar."""
    try:
        load_members(r)
        return True
    except (TarError, OSError, EOFError) as e:
        counter.skip("bad_tar", r["__shard__"], r["__key__"], f"{type(e).__name__}: {e}", count=count)
        return False


def read_piece(piece: Piece, counter: SkipCounter, count: bool = True) -> Iterator[dict[str, Any]]:
    """The usable records of one piece of a shard: positions [lo, hi) (or every stride-th), in shard order.

    Positions count usable records only (what the sample counts count), so adjacent pieces of one shard never
    overlap. A bad record belongs to the piece holding the next position (trailing ones to the piece that ends
    the shard); shard-level failures to the piece that starts it."""
    n = 0
    hi = piece.hi
    to_end = hi is None or (piece.total is not None and hi >= piece.total)
    held = None  # the shard's last usable record, yielded after the trailing members are read and counted
    for r in iter_tar(piece.url, counter, count=count and piece.owns_head, lazy=True):
        meta, reason, detail = json_of(r)
        owned = piece.lo <= n and (hi is None or n < hi or to_end)
        if meta is None:
            if piece.stride == 1:
                counter.skip(reason, piece.url, r["__key__"], detail, count=count and owned)
            elif n % piece.stride == piece.offset:
                counter.skip(reason, piece.url, r["__key__"], detail, count=count)
            continue
        pos = n
        n += 1
        if pos < piece.lo or pos % piece.stride != piece.offset:
            continue
        if hi is not None and pos >= hi:
            if to_end:
                continue  # read on: trailing bad records are this piece's to count
            return
        r["json"] = meta
        r["__count__"] = count
        if not _loaded(r, counter, count):
            return
        if to_end and piece.total is not None and pos == piece.total - 1:
            # A consumer that has its quota stops pulling after this record: read on first, so that trailing
            # records without (valid) json in the last shard are counted too.
            held = r
            continue
        yield r
    if held is not None:
        yield held
