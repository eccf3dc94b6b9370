"""Issue 11, the smaller defects: each test failed on the code before the fix."""

import io
import json
import tarfile

import pytest
from PIL import Image

from pipeline.data import DataConfig, render
from pipeline.data.prompts import PromptError
from pipeline.data.shardlists import scan_tar_count
from pipeline.data.tarwrite import Sample, write_tar
from tests.datagen import make_loader, png_bytes, sqa_meta, tiny_tokenizer

K = 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _good(key, i):
    return Sample(key, {"json": json.dumps(sqa_meta(i, has_image=False)).encode()})


def test_a_bad_sample_is_counted_once_per_epoch_however_often_it_is_read(tok, tmp_path):
    write_tar(
        tmp_path / "w-000000.tar",
        [
            Sample("bad", {"json": b"{nope"}),
            Sample("img", {"png": b"\x89PNG broken", "json": json.dumps(sqa_meta(9)).encode()}),
            *[_good(f"g{i}", i) for i in range(4)],
        ],
    )
    # 5 usable records, 30 per epoch: the worker reads its shard six times
    ld = make_loader(
        tok,
        str(tmp_path / "w-000000.tar"),
        batch_size=5,
        num_query_tokens=K,
        num_workers=0,
        shuffle_buffer=0,
        samples_per_epoch=30,
    )
    batches = list(ld)
    assert len(batches) == 6
    keys = [m["key"] for b in batches for m in b.meta]
    assert sorted(set(keys)) == [f"g{i}" for i in range(4)] and all(keys.count(k) == 6 for k in set(keys))
    assert ld.skipped() == {"bad_json": 1, "undecodable_image": 1}
    list(ld)  # the next epoch counts them again, once
    assert ld.skipped() == {"bad_json": 2, "undecodable_image": 2}


def test_tar_scan_counts_only_samples_the_reader_yields(tmp_path):
    p = tmp_path / "s.tar"
    write_tar(
        p,
        [_good("a", 0), _good("b", 1), Sample("nojson", {"png": png_bytes()}), Sample("badjson", {"json": b"[1, 2]"})],
    )
    with tarfile.open(p, "a") as tar:  # a member without an extension (README-like)
        info = tarfile.TarInfo("README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    assert scan_tar_count(str(p)) == 2


def test_gif_is_decoded_and_unknown_formats_are_unsupported(tok, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buf, format="GIF")
    write_tar(
        tmp_path / "g-000000.tar",
        [
            Sample("gif", {"gif": buf.getvalue(), "json": json.dumps(sqa_meta(0)).encode()}),
            Sample("svg", {"svg": b"<svg/>", "json": json.dumps(sqa_meta(1)).encode()}),
        ],
    )
    ld = make_loader(
        tok, str(tmp_path / "g-000000.tar"), batch_size=2, num_query_tokens=K, num_workers=0, shuffle_buffer=0
    )
    (b,) = list(ld)
    assert [m["key"] for m in b.meta] == ["gif"] and b.pixel_values.shape == (1, 3, 224, 224)
    assert ld.skipped() == {"unsupported_image": 1}


def test_scienceqa_without_answer_names_the_missing_field():
    meta = sqa_meta(0)
    del meta["answer"]
    with pytest.raises(PromptError) as e:
        render(meta, None, "auto", True, DataConfig())
    assert e.value.reason == "missing_field" and "'answer'" in str(e.value)


def test_the_samples_json_does_not_overwrite_the_loaders_task(tok, tmp_path):
    write_tar(
        tmp_path / "t-000000.tar",
        [Sample("k", {"json": json.dumps(sqa_meta(0, has_image=False, task="closed choice")).encode()})],
    )
    ld = make_loader(
        tok,
        str(tmp_path / "t-000000.tar"),
        task="auto",
        batch_size=1,
        num_query_tokens=K,
        num_workers=0,
        shuffle_buffer=0,
    )
    (b,) = list(ld)
    assert b.meta[0]["task"] == "scienceqa" and b.meta[0]["key"] == "k"
