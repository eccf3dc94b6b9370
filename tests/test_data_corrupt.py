"""Bad data never stops training: each kind of corruption is skipped, counted by reason (summed over DataLoader
workers) and logged with shard and key. Also: img2dataset output is readable as is for stage 1."""

import json
import logging
import tarfile

import pytest
import torch

from pipeline.data import DataConfig
from pipeline.data.collate import Collator
from pipeline.data.records import SkipCounter, iter_tar
from pipeline.data.tarwrite import Sample, write_tar
from pipeline.data.transforms import default_mean_std
from tests.datagen import make_loader, png_bytes, sqa_meta, tiny_tokenizer

K = 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _good(key, i):
    return Sample(key, {"png": png_bytes(), "json": json.dumps(sqa_meta(i)).encode()})


def _bad_shard(path, tag):
    # bad ones first: the epoch's quota ends the stream right after the last good record
    bad_png = b"\x89PNG\r\n\x1a\n garbage"
    write_tar(
        path,
        [
            Sample(f"{tag}badjson", {"png": png_bytes(), "json": b"{not json"}),
            Sample(f"{tag}nojson", {"png": png_bytes()}),
            Sample(f"{tag}badimg", {"png": bad_png, "json": json.dumps(sqa_meta(2)).encode()}),
            _good(f"{tag}g0", 0),
            _good(f"{tag}g1", 1),
        ],
    )


def _cfg(urls, **kw):
    base = dict(num_query_tokens=K, max_length=512, shuffle_buffer=0, rank=0, world_size=1)
    base.update(kw)
    return urls, base


def build_loader(cfg, tok):
    urls, base = cfg
    return make_loader(tok, urls, **base)


def test_each_corruption_is_skipped_and_counted(tmp_path, tok, caplog):
    _bad_shard(tmp_path / "c-000000.tar", "a")
    write_tar(tmp_path / "c-000001.tar", [_good(f"t{i}", i) for i in range(4)])
    with tarfile.open(tmp_path / "c-000001.tar") as tar:
        cut = tar.getmember("t2.png").offset_data + 20
    raw = (tmp_path / "c-000001.tar").read_bytes()
    (tmp_path / "c-000001.tar").write_bytes(raw[:cut])  # truncated inside t2's image
    (tmp_path / "c-000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    n_trunc = sum(1 for _ in iter_tar(str(tmp_path / "c-000001.tar"), SkipCounter()))
    assert n_trunc == 2
    # read order: not-a-tar, missing (c-000003.tar does not exist), truncated, the one with bad samples
    urls = [str(tmp_path / f"c-{i:06d}.tar") for i in (2, 3, 1, 0)]
    with caplog.at_level(logging.WARNING):
        ld = build_loader(
            _cfg(urls, batch_size=2, num_workers=0, samples_per_epoch=n_trunc + 3, shuffle_shards=False), tok
        )
        batches = list(ld)
    keys = [m["key"] for b in batches for m in b.meta]
    assert "abadimg" not in keys and set(keys) <= {"ag0", "ag1", "t0", "t1", "t2"}
    sk = ld.skipped()
    assert sk["undecodable_image"] == 1 and sk["bad_json"] == 1 and sk["missing_json"] == 1
    assert sk["bad_tar"] == 2 and sk["unreadable_shard"] == 1
    assert "shard=" in caplog.text and "key=abadjson" in caplog.text and "c-000002.tar" in caplog.text
    for b in batches:
        assert int(b.modality_mask.sum()) == b.pixel_values.shape[0] * K


def test_counters_are_summed_over_workers(tmp_path, tok):
    _bad_shard(tmp_path / "w-000000.tar", "a")
    _bad_shard(tmp_path / "w-000001.tar", "b")
    urls = [str(tmp_path / f"w-{i:06d}.tar") for i in range(2)]
    ld = build_loader(_cfg(urls, batch_size=3, num_workers=2, samples_per_epoch=6), tok)
    batches = list(ld)
    assert len(batches) == 2
    assert set(ld.shards_read) == set(urls)  # one shard per worker
    assert {b.meta[0]["shard"] for b in batches} == set(urls)
    assert ld.skipped() == {"undecodable_image": 2, "bad_json": 2, "missing_json": 2}


def test_all_bad_batch_becomes_a_dummy_row(tok):
    rec = {"__key__": "k", "__shard__": "s", "__task__": "scienceqa", "png": b"broken", "json": sqa_meta(0)}
    counter = SkipCounter()
    b = Collator(DataConfig(), tok, K, *default_mean_std())([rec], counter)
    assert b.num_samples == 0 and b.meta is None and (b.labels != -100).sum() == 1
    assert counter.counts == {"undecodable_image": 1, "empty_batch": 1}


def test_img2dataset_output_reads_as_is(tmp_path, tok):
    samples = []
    for i in range(6):
        key = f"{i:09d}"
        meta = {
            "url": f"http://x/{i}.jpg",
            "key": key,
            "status": "success",
            "caption": f"caption {i}",
            "width": 40,
            "height": 30,
            "original_width": 400,
            "original_height": 300,
            "error_message": None,
        }
        samples.append(
            Sample(
                key,
                {
                    "jpg": png_bytes(size=40, fmt="JPEG"),
                    "txt": f"caption {i}".encode(),
                    "json": json.dumps(meta).encode(),
                },
            )
        )
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 7, "successes": 6, "failed_to_download": 1}))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    ld = make_loader(
        tok,
        str(tmp_path),
        task="auto",
        batch_size=3,
        num_query_tokens=K,
        max_length=128,
        num_workers=0,
        shuffle_buffer=0,
    )
    assert ld.samples_per_epoch == 6 and len(ld) == 2
    for b in ld:
        assert b.pixel_values.shape == (3, 3, 224, 224)
        for i, m in enumerate(b.meta):
            assert m["task"] == "caption"
            lab = b.labels[i][b.labels[i] != -100]
            assert tok.decode(lab) == m["caption"] + "</s>"
    assert torch.isfinite(b.pixel_values).all()


def test_too_long_and_missing_image_are_dropped_from_the_batch(tmp_path, tok):
    long_q = "why " * 400
    write_tar(
        tmp_path / "l-000000.tar",
        [
            _good("ok0", 0),
            Sample("long", {"png": png_bytes(), "json": json.dumps(sqa_meta(1, question=long_q)).encode()}),
            Sample("noimg", {"json": json.dumps(sqa_meta(2, has_image=True)).encode()}),
            _good("ok1", 3),
        ],
    )
    ld = build_loader(_cfg([str(tmp_path / "l-000000.tar")], batch_size=4, num_workers=0, max_length=256), tok)
    (b,) = list(ld)
    assert [m["key"] for m in b.meta] == ["ok0", "ok1"] and b.pixel_values.shape[0] == 2
    assert b.input_ids.shape[1] <= 256
    assert ld.skipped() == {"too_long": 1, "missing_image": 1}
