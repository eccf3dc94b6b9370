"""shards.writer: size-bounded plan, temp-then-rename, index/stats, resume, parallel determinism."""

import json
import tarfile

import pytest

from shards.writer import Sample, SkipSample, WriterConfig, plan_shards, write_shards

CALLS = []


def _make(i: int) -> Sample:
    CALLS.append(i)
    if i == 3:
        raise SkipSample("missing_image", f"k{i}")
    if i == 7:
        raise SkipSample("empty_answer", f"k{i}")
    return Sample(f"k{i:03d}", {"json": json.dumps({"i": i}).encode(), "txt": b"x" * (i + 1)})


def _crash_at_5(i: int) -> Sample:
    if i == 5:
        raise RuntimeError("boom")
    return _make(i)


def test_plan_bounds_count_and_size():
    assert plan_shards([1] * 10, 4, 100) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards([60, 60, 10, 10, 100, 5], 100, 100) == [(0, 1), (1, 4), (4, 5), (5, 6)]
    assert plan_shards([500], 10, 100) == [(0, 1)]  # an oversized item still gets written, alone
    assert plan_shards([], 3, 10) == []


def test_write_index_skips_and_resume(tmp_path):
    cfg = WriterConfig(out_dir=tmp_path, name="t", max_samples=4, progress=False)
    items = list(range(10))
    keys = [f"k{i:03d}" for i in items]
    CALLS.clear()
    idx = write_shards(items, keys, [10] * 10, _make, cfg)
    assert [p.name for p in sorted(tmp_path.glob("*.tar"))] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    assert [s["samples"] for s in idx["shards"]] == [3, 3, 2]
    assert idx["total_samples"] == 8 and idx["skipped"] == {"missing_image": 1, "empty_answer": 1}
    assert idx["complete"]
    on_disk = json.loads((tmp_path / "t-index.json").read_text())
    assert on_disk["total_samples"] == 8
    with tarfile.open(tmp_path / "t-000000.tar") as tar:
        assert tar.getnames()[:2] == ["k000.json", "k000.txt"]

    # resume: only the missing shard is redone
    (tmp_path / "t-000001.tar").unlink()
    CALLS.clear()
    idx2 = write_shards(items, keys, [10] * 10, _make, cfg)
    assert CALLS == [4, 5, 6, 7] and idx2["total_samples"] == 8
    CALLS.clear()
    write_shards(items, keys, [10] * 10, _make, cfg)
    assert CALLS == []
    # a different plan (other keys) is not mistaken for a complete shard
    write_shards(items, [k + "x" for k in keys], [10] * 10, _make, cfg)
    assert len(CALLS) == 10


def test_crash_never_leaves_a_half_shard_under_its_final_name(tmp_path):
    cfg = WriterConfig(out_dir=tmp_path, name="c", max_samples=4, progress=False)
    items = list(range(10))
    keys = [str(i) for i in items]
    with pytest.raises(RuntimeError):
        write_shards(items, keys, [1] * 10, _crash_at_5, cfg)
    assert (tmp_path / "c-000000.tar").exists()
    assert not (tmp_path / "c-000001.tar").exists()  # the shard being written when it crashed
    idx = json.loads((tmp_path / "c-index.json").read_text())
    assert idx["complete"] is False
    idx = write_shards(items, keys, [1] * 10, _make, cfg)
    assert idx["complete"] and idx["total_samples"] == 8


def test_parallel_workers_write_identical_bytes(tmp_path):
    items = list(range(12))
    keys = [str(i) for i in items]
    for w, d in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        write_shards(
            items, keys, [1] * 12, _make, WriterConfig(out_dir=d, name="p", max_samples=3, workers=w, progress=False)
        )
    for i in range(4):
        assert (tmp_path / "a" / f"p-{i:06d}.tar").read_bytes() == (tmp_path / "b" / f"p-{i:06d}.tar").read_bytes()


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="name"):
        WriterConfig(out_dir=tmp_path, name="a.b")
    with pytest.raises(ValueError, match="max_samples"):
        WriterConfig(out_dir=tmp_path, name="a", max_samples=0)
