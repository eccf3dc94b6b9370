"""Nothing dropped uncounted (issue 28, item 5): truncation to max_length counted per source (or skipped, or an
error: data.on_overflow), a trailing tar member without its json counted, images over data.max_image_pixels refused
from the header before decoding (training, evaluation, pipeline.generate's image loading), whole-epoch step counts."""

from __future__ import annotations

import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from pipeline.data import SourceConfig
from pipeline.data.eval import default_data_config, image_tensor, iter_eval_samples
from pipeline.data.tarwrite import add_member
from tests.datagen import make_loader, sqa_sample, tiny_tokenizer, write_sqa_shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def huge_png_header(w: int = 12000, h: int = 12000) -> bytes:
    """A PNG whose header declares w x h pixels (no pixel data: decoding it could only fail or blow up)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _epoch(loader):
    n = sum(b.samples for b in loader)
    return n, loader.skipped()


def test_image_over_max_pixels_is_refused_from_its_header_and_counted(tmp_path, tok):
    from pipeline.data.tarwrite import write_tar

    samples = [sqa_sample(f"k{i:03d}", i) for i in range(8)]
    samples[3].files["png"] = huge_png_header()
    write_tar(tmp_path / "s-000000.tar", samples)
    _, skipped = _epoch(make_loader(tok, str(tmp_path / "s-000000.tar"), batch_size=4, num_workers=0))
    assert skipped.get("image_too_large") == 1, skipped
    assert "undecodable_image" not in skipped

    cfg = default_data_config(num_query_tokens=4)
    got = list(iter_eval_samples(str(tmp_path / "s-000000.tar"), tok, cfg, 4, task="scienceqa"))
    assert len(got) == 7  # the evaluation drops (and counts) it the same way


def test_generate_image_over_max_pixels_names_the_file(tmp_path):
    class Model:
        vpg = None

    f = tmp_path / "big.png"
    f.write_bytes(huge_png_header())
    with pytest.raises(ValueError, match=r"big\.png.*12000x12000.*max_image_pixels"):
        image_tensor(f, Model())
    g = tmp_path / "README.md"
    g.write_text("# not an image\n")
    with pytest.raises(ValueError, match=r"README\.md"):
        image_tensor(g, Model())


def test_trailing_member_without_json_in_the_last_shard_is_counted(tmp_path, tok):
    urls = write_sqa_shards(tmp_path, 2, 4)
    with tarfile.open(urls[-1], "a") as tar:  # a last member whose sample has no json
        add_member(tar, "zzz_orphan.png", b"\x89PNG not really")
    n, skipped = _epoch(make_loader(tok, urls, batch_size=4, num_workers=0, shuffle_buffer=0))
    assert n == 8
    assert skipped.get("missing_json") == 1, skipped


def _long_shard(tmp_path: Path) -> str:
    """Samples whose answer (QCM-ALE: "The answer is X. BECAUSE: <solution>") runs past max_length=128."""
    urls = write_sqa_shards(tmp_path, 1, 8, solution=" ".join(["because"] * 200))
    return urls[0]


def test_truncation_is_counted_per_source_with_the_answer_tokens_lost(tmp_path, tok):
    url = _long_shard(tmp_path)
    src = [SourceConfig(url, task="scienceqa")]
    n, skipped = _epoch(make_loader(tok, src, batch_size=4, num_workers=0, max_length=128, sqa_format="QCM-ALE"))
    assert n == 8
    assert skipped.get("truncated/0") == 8, skipped
    assert skipped.get("truncated_answer_tokens/0", 0) > 0, skipped


def test_on_overflow_skip_and_error(tmp_path, tok):
    url = _long_shard(tmp_path)
    src = [SourceConfig(url, task="scienceqa")]
    kw = dict(batch_size=4, num_workers=0, max_length=128, sqa_format="QCM-ALE")
    n, skipped = _epoch(make_loader(tok, src, on_overflow="skip", **kw))
    assert n == 0 and skipped.get("too_long") == 8, skipped
    with pytest.raises(ValueError, match=r"s-000000\.tar key .*max_length=128.*on_overflow=error"):
        _epoch(make_loader(tok, src, on_overflow="error", **kw))


def test_on_overflow_and_max_image_pixels_are_checked(tok):
    from pipeline.data import DataConfig

    with pytest.raises(ValueError, match="data.on_overflow"):
        DataConfig(on_overflow="drop")
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        DataConfig(max_image_pixels=0)


def test_one_epoch_of_steps_stays_inside_the_epoch(tmp_path, tok):
    """epochs: 1 -> whole steps inside the pass: the rounded-up last step read (and counted) the next pass."""
    from pipeline.training.data_glue import StageData

    loader = make_loader(tok, write_sqa_shards(tmp_path, 1, 10), batch_size=2, num_workers=0)  # 5 batches
    data = StageData.__new__(StageData)
    data.loader = loader
    assert data.steps_for_epochs(1, 2) == 2  # 5 batches / accumulation 2: 2 whole steps, not 3
    assert data.steps_for_epochs(2, 2) == 5


def test_builders_refuse_an_image_over_max_pixels_from_its_header(tmp_path):
    from shards.common import read_image
    from shards.writer import SkipSample

    f = tmp_path / "big.png"
    f.write_bytes(huge_png_header())
    with pytest.raises(SkipSample) as e:
        read_image(f, None, "k1")
    assert e.value.reason == "image_too_large" and "big.png" in e.value.detail


def test_damaged_tar_count_message_says_what_is_trained(tmp_path, caplog):
    from pipeline.data.shardlists import scan_tar_count

    (url,) = write_sqa_shards(tmp_path, 1, 6)
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 3])  # cut mid-file (the end of a tar is mostly padding)
    with caplog.at_level("WARNING"):
        n = scan_tar_count(url)
    assert 0 < n < 6
    assert f"counting the {n} sample(s) before the damage" in caplog.text and "as 0" not in caplog.text
