"""Issue 11 defects 1-2: every epoch is an exact permutation of the dataset (shuffle on), and a lost shard never
stops a rank. Each test failed on the loader before the fix (shuffle buffer filled from the wrapping stream; a
worker without a readable sample raised)."""

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from tests.datagen import make_loader, tiny_tokenizer, write_sqa_shards

K, B = 4, 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    """12 equal shards (not a multiple of most rank x worker counts), 192 samples = 12 x 16."""
    return write_sqa_shards(tmp_path_factory.mktemp("bal"), 12, 16, image=False)


def _epoch(tok, urls, world, workers, epochs=1, **kw):
    """Keys per rank per epoch: [[epoch 0 keys of rank 0, ...], ...]; also checks equal batch counts."""
    out = []
    loaders = [
        make_loader(
            tok,
            urls,
            batch_size=B,
            num_query_tokens=K,
            num_workers=workers,
            rank=r,
            world_size=world,
            shuffle_buffer=kw.pop("shuffle_buffer", 24),
            **kw,
        )
        for r in range(world)
    ]
    for _ in range(epochs):
        keys = []
        for ld in loaders:
            batches = list(ld)
            assert len(batches) == len(loaders[0])
            keys.append([m["key"] for b in batches for m in b.meta])
        out.append(keys)
    return out, loaders


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_every_epoch_is_an_exact_permutation(tok, balanced, world, workers):
    (keys,), _ = _epoch(tok, balanced, world, workers)
    flat = [k for rank in keys for k in rank]
    assert len(flat) == 192 and len(set(flat)) == 192, Counter(flat).most_common(3)


def test_epochs_differ_in_order_and_resume_stays_exact(tok, balanced):
    (e0, e1), (ld,) = _epoch(tok, balanced, 1, 2, epochs=2)
    assert sorted(e0[0]) == sorted(e1[0]) and e0[0] != e1[0]
    state = {"epoch": 1, "batch": 7}
    resumed = make_loader(tok, balanced, batch_size=B, num_query_tokens=K, num_workers=2, shuffle_buffer=24)
    resumed.load_state_dict(state)
    tail = [m["key"] for b in resumed for m in b.meta]
    assert tail == e1[0][7 * B :]


def test_unbalanced_shards_repeat_nothing_and_leave_less_than_a_global_batch(tok, tmp_path):
    urls = write_sqa_shards(tmp_path, 5, [3, 17, 8, 1, 12], image=False)  # 41 samples
    for world, workers in ((1, 2), (2, 2), (3, 1)):
        (keys,), loaders = _epoch(tok, urls, world, workers)
        flat = [k for rank in keys for k in rank]
        assert len(flat) == len(set(flat)) == len(loaders[0]) * world * B  # no repeats
        assert 41 - len(flat) < world * B  # unseen: the remainder of the global batch only


def _index(paths, counts, name="s"):
    d = Path(paths[0]).parent
    idx = {
        "format": "pill-shards/1",
        "name": name,
        "shards": [{"file": Path(p).name, "samples": n} for p, n in zip(paths, counts)],
    }
    (d / f"{name}-index.json").write_text(json.dumps(idx))
    return str(d / f"{name}-index.json")


@pytest.mark.parametrize("damage", ["missing", "not_a_tar", "all_bad"])
def test_a_lost_shard_never_stops_a_rank(tok, tmp_path, caplog, damage):
    urls = write_sqa_shards(tmp_path, 4, 8, image=False)
    index = _index(urls, [8] * 4)
    lost = Path(urls[1])
    if damage == "missing":
        lost.unlink()
    elif damage == "not_a_tar":
        lost.write_bytes(b"not a tar" * 100)
    else:
        from pipeline.data.tarwrite import Sample, write_tar

        write_tar(lost, [Sample(f"bad{i}", {"json": b"{broken"}) for i in range(8)])
    with caplog.at_level(logging.WARNING):
        (keys,), loaders = _epoch(tok, index, 2, 2)
    assert all(len(k) == len(loaders[0]) * B for k in keys)  # every rank its full quota
    assert len(loaders[0]) == 32 // (2 * B)
    skipped = Counter()
    for ld in loaders:
        skipped.update(ld.skipped())
    if damage == "all_bad":
        assert skipped == {"bad_json": 8}
    else:
        assert skipped == {"unreadable_shard" if damage == "missing" else "bad_tar": 1}
    flat = [k for rank in keys for k in rank]
    assert not any(k.startswith("s001_") for k in flat)
    assert len(set(flat)) == 24  # everything readable was seen; the lost quota came from repeats


def test_a_lost_shard_is_logged_once_per_epoch(tok, tmp_path, caplog):
    urls = write_sqa_shards(tmp_path, 4, 8, image=False)
    index = _index(urls, [8] * 4)
    Path(urls[2]).unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.data.records"):
        (keys,), (ld,) = _epoch(tok, index, 1, 0)  # in-process: the skip log reaches caplog
    assert len(keys[0]) == 32 and ld.skipped() == {"unreadable_shard": 1}
    assert caplog.text.count("skipped (unreadable_shard)") == 1 and urls[2] in caplog.text


def test_no_readable_shard_at_all_is_a_clear_error_before_training(tok, tmp_path):
    urls = write_sqa_shards(tmp_path, 2, 4, image=False)
    index = _index(urls, [4, 4])
    for u in urls:
        Path(u).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no readable sample in any of the 2 shard\(s\)") as e:
        make_loader(tok, index, batch_size=B, num_query_tokens=K, num_workers=0)
    assert "s-000000.tar" in str(e.value)
