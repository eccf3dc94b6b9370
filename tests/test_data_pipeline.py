"""The WebDataset pipeline: rank/worker splitting without overlap or loss, equal batch counts on every rank,
determinism, exact resume, resampling, mixing, packing — and the webdataset traps it designs out."""

import logging
import random

import pytest
import torch

from pipeline.data import SourceConfig
from pipeline.data.loader import split_batches
from pipeline.data.shardlists import assign_shards, expand_shards
from tests.datagen import make_loader, tiny_tokenizer, write_sqa_shards

K = 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("sh")
    return write_sqa_shards(d, 8, [6, 5, 6, 4, 6, 6, 5, 6], image=False), d


def _cfg(urls, **kw):
    """Flat loader settings (DataConfig fields and build_loader arguments); see tests.datagen.make_loader."""
    base = dict(batch_size=4, num_query_tokens=K, max_length=512, shuffle_buffer=8, num_workers=2, rank=0, world_size=1)
    base.update(kw)
    return urls, base


def build(cfg, tok, **kw):
    urls, base = cfg
    return make_loader(tok, urls, **{**base, **kw})


def _keys(loader):
    return [[m["key"] for m in b.meta] for b in loader]


def test_assignment_is_a_partition_for_every_layout():
    urls = [f"s{i}" for i in range(7)]
    for world in (1, 2, 3):
        for nw in (1, 2):
            got = [assign_shards(urls, 0, 3, r, world, w, nw) for r in range(world) for w in range(nw)]
            flat = [u for a in got for u in a.shards]
            assert sorted(flat) == sorted(urls) and all(a.sample_stride == 1 for a in got)
            assert all(a.shards for a in got)  # nobody empty
    a0 = assign_shards(urls, 0, 0, 0, 2, 0, 1).shards
    assert a0 != assign_shards(urls, 0, 1, 0, 2, 0, 1).shards  # reshuffled per epoch
    assert expand_shards("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]


def test_explicit_rank_splitter_where_webdataset_default_raises(shards, tok, monkeypatch):
    urls, _ = shards
    import webdataset as wds

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="nodesplitter"):  # the trap: webdataset's default single_node_only
        next(iter(wds.WebDataset(urls, shardshuffle=False)))
    cfg = _cfg(urls, rank=None, world_size=None, num_workers=0)
    spec = build(cfg, tok).cfg
    assert (spec.rank, spec.world_size) == (1, 2)
    other = _cfg(urls, rank=0, world_size=2, num_workers=0)
    k1 = {k for b in _keys(build(cfg, tok)) for k in b}
    k0 = {k for b in _keys(build(other, tok)) for k in b}
    assert k1 and k0 and not (k1 & k0)


def test_every_rank_yields_the_same_number_of_batches(shards, tok):
    urls, _ = shards  # 44 samples in uneven shards
    counts, keys, shards_read = [], [], []
    for rank in range(3):
        ld = build(_cfg(urls, rank=rank, world_size=3, shuffle_buffer=0), tok)
        batches = _keys(ld)
        counts.append((len(batches), len(ld)))
        keys.append({k for b in batches for k in b})
        shards_read.append(set(ld.shards_read))
    assert counts == [(44 // 12, 44 // 12)] * 3
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])  # no sample on two ranks
    # contiguous shares of the epoch: ranks share at most the shard at each end of their range
    assert all(len(a & b) <= 1 for i, a in enumerate(shards_read) for b in shards_read[i + 1 :])


def test_fewer_shards_than_workers_splits_by_sample(tmp_path, tok):
    urls = write_sqa_shards(tmp_path, 1, 16, image=False)
    seen = []
    for rank in range(2):
        ld = build(_cfg(urls, rank=rank, world_size=2, batch_size=2, shuffle_buffer=0), tok)
        batches = _keys(ld)
        assert len(batches) == len(ld) == 4  # 16 / (2 ranks x 2)
        seen += [k for b in batches for k in b]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16  # nothing twice, nothing lost


def test_remote_shards_without_counts_fall_back_to_whole_shards(tmp_path, tok, caplog):
    """pipe: shards without an index: shards round-robin over the slots, sample split when too few."""
    paths = write_sqa_shards(tmp_path, 1, 16, image=False)
    seen = []
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            ld = build(
                _cfg(
                    [f"pipe:cat {paths[0]}"],
                    rank=rank,
                    world_size=2,
                    batch_size=2,
                    shuffle_buffer=0,
                    samples_per_epoch=16,
                ),
                tok,
            )
            seen += [k for b in _keys(ld) for k in b]
    assert "splitting by sample" in caplog.text
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16


def test_deterministic_given_seed_epoch_rank(shards, tok):
    urls, _ = shards
    a = _keys(build(_cfg(urls), tok))
    b = _keys(build(_cfg(urls), tok))
    assert a == b
    ld = build(_cfg(urls), tok)
    e0, e1 = _keys(ld), _keys(ld)  # iterating again = next epoch
    assert e0 == a and e1 != e0 and ld.state_dict()["epoch"] == 2
    assert _keys(build(_cfg(urls, seed=1), tok)) != a


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_same_sequence(shards, tok, num_workers):
    urls, _ = shards
    cfg = _cfg(urls, num_workers=num_workers, batch_size=3)
    full = _keys(build(cfg, tok))
    ld = build(cfg, tok)
    it = iter(ld)
    head = [[m["key"] for m in next(it).meta] for _ in range(5)]
    state = ld.state_dict()
    del it
    assert state["batch"] == 5 and state["epoch"] == 0
    resumed = build(cfg, tok)
    resumed.load_state_dict(state)
    tail = _keys(resumed)
    assert head + tail == full
    assert _keys(build(cfg, tok, start_batch=5)) == tail
    assert resumed.state_dict()["epoch"] == 1


def test_resampled_mode_has_the_requested_length(shards, tok):
    urls, _ = shards
    cfg = _cfg(urls, resampled=True, samples_per_epoch=40, world_size=2, rank=1)
    a, b = _keys(build(cfg, tok)), _keys(build(cfg, tok))
    assert a == b and len(a) == 40 // (2 * 4)
    with pytest.raises(ValueError, match="data.resampled needs samples_per_epoch"):
        build(_cfg(urls, resampled=True), tok)


def test_sources_mixed_by_weight(tmp_path, tok):
    a = write_sqa_shards(tmp_path / "a", 2, 20, name="a", image=False)
    b = write_sqa_shards(tmp_path / "b", 2, 20, name="b", image=False)
    cfg = _cfg(
        a,
        sources=[SourceConfig(a, task="scienceqa", weight=3), SourceConfig(b, task="scienceqa", weight=1)],
        samples_per_epoch=400,
        shuffle_buffer=0,
        batch_size=8,
    )
    keys = [k for ks in _keys(build(cfg, tok)) for k in ks]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert len(keys) == 400 and 0.65 < frac_a < 0.85


def test_packing_matches_padding(shards, tok):
    urls, _ = shards
    padded = next(iter(build(_cfg(urls, num_workers=0), tok)))
    packed = next(iter(build(_cfg(urls, num_workers=0, pack=True), tok)))
    lens = padded.attention_mask.sum(1)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0] + torch.cumsum(lens, 0).tolist()
    assert packed.input_ids.shape == (1, int(lens.sum()))
    for i, n in enumerate(lens.tolist()):
        s = int(packed.cu_seqlens[i])
        for k in ("input_ids", "labels", "modality_mask"):
            assert torch.equal(getattr(packed, k)[0, s : s + n], getattr(padded, k)[i, :n]), k
        assert packed.position_ids[0, s : s + n].tolist() == list(range(n))
    assert packed.num_samples == padded.num_samples == len(lens)
    # right padding: real tokens first
    m = padded.attention_mask
    assert torch.equal(m, (torch.arange(m.shape[1])[None] < lens[:, None]).long())


def test_split_batches_matches_dataloader_round_robin():
    for n in range(0, 11):
        for nw in (1, 2, 3):
            order = [i % nw for i in range(n)]
            assert [order.count(w) for w in range(nw)] == [split_batches(n, nw, w) for w in range(nw)]
    random.seed(0)


def test_eval_samples_are_the_training_prompts_in_order(shards, tok):
    from pipeline.data import iter_eval_samples

    urls, _ = shards
    cfg = _cfg(urls[:2], num_workers=0, shuffle_buffer=0, shuffle_shards=False, batch_size=11)
    evals = list(iter_eval_samples(urls[:2], tok, build(cfg, tok).cfg.data, K, task="scienceqa"))
    train = next(iter(build(cfg, tok)))
    assert [e["meta"]["key"] for e in evals] == [m["key"] for m in train.meta]
    for i, e in enumerate(evals):
        n = e["input_ids"].shape[1]
        assert torch.equal(e["input_ids"][0], train.input_ids[i, :n])
        assert (train.labels[i, :n] == -100).all() and train.labels[i, n] != -100
        assert e["target"].startswith("The answer is ")
