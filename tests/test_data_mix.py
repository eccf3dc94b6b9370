"""Mixed sources in a stage (pipeline.data.mix): the mix holds per global batch, the same global batches for every
world size and DataLoader worker count, each source's own epochs exact, the mix part of the resume state.

Ranks are emulated in one process (rank=r, world_size=w per loader), as in test_data_epoch.py."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import numpy as np
import pytest

from pipeline.data import SourceConfig
from pipeline.data.mix import MixChangedError, MixSchedule, MixSpec
from pipeline.data.tarwrite import Sample, write_tar
from tests.datagen import make_loader, tiny_tokenizer, write_sqa_shards

B, G = 4, 8  # micro-batch per rank, global batch (world 1: accumulation 2; world 2: accumulation 1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def write_chat_shards(out, n_shards: int, per_shard: int, name: str = "t") -> list[str]:
    """Text-only conversations (the records `python -m shards.replay` writes): no image member."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{name}{s:03d}_{i:03d}"
            conv = [{"from": "human", "value": f"Say {key}."}, {"from": "gpt", "value": f"{key}."}]
            meta = {"id": key, "has_image": False, "source": "replay", "conversations": conv}
            samples.append(Sample(key, {"json": json.dumps(meta).encode()}))
        write_tar(out / f"{name}-{s:06d}.tar", samples)
        paths.append(str(out / f"{name}-{s:06d}.tar"))
    return paths


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    sqa = write_sqa_shards(d / "sqa", 3, 8, name="q")  # 24 samples with images
    chat = write_chat_shards(d / "chat", 2, 4)  # 8 text-only conversations
    return sqa, chat


def _sources(sqa, chat, w_sqa=3.0, w_chat=1.0, name_chat="chat"):
    return [
        SourceConfig(sqa, task="scienceqa", weight=w_sqa, name="sqa"),
        SourceConfig(chat, task="auto", weight=w_chat, name=name_chat),
    ]


def _loaders(tok, sources, world, workers, **kw):
    kw = {"samples_per_epoch": 32, "shuffle_buffer": 4, "global_batch": G, **kw}
    return [
        make_loader(tok, sources, rank=r, world_size=world, batch_size=B, num_workers=workers, **kw)
        for r in range(world)
    ]


def _positions(loaders) -> tuple[list[int], list[str]]:
    """One epoch of every rank, laid out by absolute position: (source id, key) per position."""
    world = len(loaders)
    per_rank = [list(ld) for ld in loaders]
    n = len(per_rank[0]) * world * B
    src, keys = [None] * n, [None] * n
    for r, batches in enumerate(per_rank):
        for b, batch in enumerate(batches):
            assert batch.samples == B and batch.source.shape == (B,)
            for j in range(B):
                p = (b * world + r) * B + j
                src[p], keys[p] = int(batch.source[j]), batch.meta[j]["key"]
                assert keys[p].startswith("q" if src[p] == 0 else "t")  # the row's source field is its source's
                assert batch.modality_mask[j].any() == (src[p] == 0)  # text-only rows carry no visual position
    return src, keys


def test_schedule_holds_the_mix_in_every_global_batch():
    for weights, gb in (((3.0, 1.0), 8), ((1.0, 1.0, 1.0), 8), ((0.7, 0.2, 0.1), 10), ((5.0, 1.0), 3)):
        sch = MixSchedule(MixSpec(weights, gb, seed=1))
        share = np.asarray(weights) / sum(weights) * gb
        cum = np.zeros(len(weights))
        for g in range(200):
            ids = sch.batch(g)
            c = np.bincount(ids, minlength=len(weights))
            assert len(ids) == gb and c.sum() == gb
            assert all(math.floor(s) <= x <= math.ceil(s) for s, x in zip(share, c)), (weights, g, c)
            cum += c
            assert np.abs(cum - (g + 1) * share).max() < 1 + 1e-9  # the running totals never drift a sample
            assert (sch.before((g + 1) * gb) == cum).all()
        assert (
            sch.before(5 * gb + 3) == sch.before(5 * gb) + np.bincount(sch.batch(5)[:3], minlength=len(weights))
        ).all()
    a, b = MixSchedule(MixSpec((1.0, 1.0), 8, 0)), MixSchedule(MixSpec((1.0, 1.0), 8, 1))
    assert (a.sources(0, 400) == MixSchedule(MixSpec((1.0, 1.0), 8, 0)).sources(0, 400)).all()  # per seed
    assert (a.sources(0, 400) != b.sources(0, 400)).any()  # placement differs by seed
    with pytest.raises(ValueError, match="> 0"):
        MixSpec((1.0, 0.0), 8, 0)


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_global_batch_is_the_schedules_for_any_world_size_and_worker_count(tok, two_sources, world, workers):
    sqa, chat = two_sources
    loaders = _loaders(tok, _sources(sqa, chat), world, workers)
    src, keys = _positions(loaders)
    expected = MixSchedule(MixSpec((3.0, 1.0), G, seed=0)).sources(0, len(src))
    assert src == expected.tolist()  # the same global batches whatever the layout
    for g in range(len(src) // G):
        assert Counter(src[g * G : (g + 1) * G]) == {0: 6, 1: 2}  # 3:1 in every global batch of 8
    # each source reads its own sequence exactly: 24 ScienceQA samples once, 8 chat samples once
    assert Counter(k for k, s in zip(keys, src) if s == 0) == Counter(f"q{i // 8:03d}_{i:05d}" for i in range(24))
    assert sorted(k for k, s in zip(keys, src) if s == 1) == sorted(
        f"t{s:03d}_{i:03d}" for s in range(2) for i in range(4)
    )
    progress = loaders[0].source_progress()
    assert progress == {"sqa": (24, 1.0), "chat": (8, 1.0)}


def test_a_small_source_cycles_through_its_own_epochs_exactly(tok, two_sources):
    sqa, chat = two_sources
    loaders = _loaders(tok, _sources(sqa, chat, 1.0, 1.0), 2, 2)
    src, keys = _positions(loaders)  # 32 positions: 16 of each; chat holds 8, so two whole chat epochs
    chat_keys = [k for k, s in zip(keys, src) if s == 1]
    assert len(chat_keys) == 16 and set(Counter(chat_keys).values()) == {2}
    sqa_keys = [k for k, s in zip(keys, src) if s == 0]
    assert len(sqa_keys) == len(set(sqa_keys)) == 16
    assert loaders[1].source_progress() == {"sqa": (16, 16 / 24), "chat": (16, 2.0)}
    src2, keys2 = _positions(loaders)  # stage epoch 1: sqa continues with its 8 unseen samples, then a new epoch
    sqa2 = [k for k, s in zip(keys2, src2) if s == 0]
    assert len(sqa2) == 16 and set(sqa_keys) | set(sqa2) == {f"q{i // 8:03d}_{i:05d}" for i in range(24)}


def test_resume_mid_epoch_continues_the_same_mixed_sequence(tok, two_sources):
    sqa, chat = two_sources
    full = [(b.source.tolist(), [m["key"] for m in b.meta]) for b in _loaders(tok, _sources(sqa, chat), 1, 2)[0]]
    (first,) = _loaders(tok, _sources(sqa, chat), 1, 2)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    (again,) = _loaders(tok, _sources(sqa, chat), 1, 2)
    again.load_state_dict(state)
    rest = [(b.source.tolist(), [m["key"] for m in b.meta]) for b in again]
    assert [(b.source.tolist(), [m["key"] for m in b.meta]) for b in head] + rest == full


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(w_sqa=1.0), "source sqa: weight 3.0 -> 1.0"),
        (dict(name_chat="replay"), "sources ['sqa', 'chat'] -> ['sqa', 'replay']"),
    ],
)
def test_resuming_with_another_mix_is_an_error_naming_what_changed(tok, two_sources, change, named, caplog):
    sqa, chat = two_sources
    (ld,) = _loaders(tok, _sources(sqa, chat), 1, 0)
    state = ld.state_dict()
    (other,) = _loaders(tok, _sources(sqa, chat, **change), 1, 0)
    with pytest.raises(MixChangedError, match=named.replace("[", r"\[").replace("]", r"\]")):
        other.load_state_dict(state)
    (regrouped,) = _loaders(tok, _sources(sqa, chat), 1, 0, global_batch=4)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.mix"):
        regrouped.load_state_dict(state)  # same mix, other global batches: resumable, said in the log
    assert "global batch 8 -> 4" in caplog.text


def test_global_batch_must_be_whole_micro_batches(tok, two_sources):
    sqa, chat = two_sources
    with pytest.raises(ValueError, match="global_batch 6 is not a multiple of batch_size x world_size = 8"):
        _loaders(tok, _sources(sqa, chat), 2, 0, global_batch=6)
