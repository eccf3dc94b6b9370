"""shards.encode: pixel shards -> K x W fp16 feature shards equal to running the frozen VPG; training reads them."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, SourceConfig, build_loader
from pipeline.data.transforms import decode_image, default_mean_std, normalise
from pipeline.model import load_clip
from pipeline.model.methods import clip_features
from shards.demo import DemoConfig, build_demo
from shards.encode import load_vpg, main
from tests.datagen import tiny_tokenizer


def test_encode_demo_and_train_on_features(tmp_path):
    build_demo(DemoConfig(n_train=12, n_val=0, image_size=64), tmp_path / "px", max_samples=6)
    (tmp_path / "px" / "train-000001.tar").write_bytes(b"")  # replaced below by a shard with a corrupt image
    from shards.writer import Sample, write_tar

    good = {"json": json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}).encode()}
    two = {"json": json.dumps({"question": "<image> or <image>?", "choices": ["a", "b"], "answer": 0}).encode()}
    write_tar(
        tmp_path / "px" / "train-000001.tar",
        [
            Sample("ok", {"png": _png(), **good}),
            Sample("bad", {"png": b"\x89PNG broken", **good}),
            Sample("two", {"0.png": _png(), "1.png": _png(), **two}),
        ],
    )
    vpg_dir = tmp_path / "vpg"
    args = [
        "--shards",
        str(tmp_path / "px" / "train-{000000..000001}.tar"),
        "--vpg",
        "tiny",
        "--tiny-dir",
        str(vpg_dir),
        "--out",
        str(tmp_path / "ft"),
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0
    idx = json.loads((tmp_path / "ft" / "train-index.json").read_text())
    assert idx["total_samples"] == 8 and idx["skipped"] == {"undecodable_image": 1} and idx["content"] == "features"
    with tarfile.open(tmp_path / "ft" / "train-000001.tar") as tar:
        names = [m.name for m in tar]
    assert {"two.0.feat.npy", "two.1.feat.npy", "two.json"} <= set(names) and "two.0.png" not in names
    vpg = load_vpg("tiny", vpg_dir)
    K, W = vpg.num_query_tokens, vpg.width
    with tarfile.open(tmp_path / "ft" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    with tarfile.open(tmp_path / "px" / "train-000000.tar") as tar:
        src = {m.name: tar.extractfile(m).read() for m in tar}
    assert not any(n.endswith(".png") for n in members) and members["train_000000.json"] == src["train_000000.json"]
    feat = np.load(io.BytesIO(members["train_000000.feat.npy"]))
    assert feat.shape == (K, W) and feat.dtype == np.float16
    mean, std = default_mean_std()
    ref = vpg(normalise([decode_image(src["train_000000.png"], 224)], mean, std, 224))[0]
    torch.testing.assert_close(torch.from_numpy(feat).float(), ref, atol=2e-3, rtol=2e-3)

    # resume keeps finished shards
    mtime = (tmp_path / "ft" / "train-000000.tar").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "ft" / "train-000000.tar").stat().st_mtime_ns == mtime

    tok = tiny_tokenizer(tmp_path / "tok")
    cfg = DataConfig(max_length=256, num_workers=0, shuffle_buffer=0)
    batches = list(
        build_loader(
            cfg,
            tok,
            sources=[SourceConfig(str(tmp_path / "ft" / "train-index.json"), task="scienceqa")],
            batch_size=4,
            num_query_tokens=K,
        )
    )
    assert len(batches) == 8 // 4
    for b in batches:
        n_img = int(b.modality_mask.sum()) // K  # one per sample, two for "two"
        assert b.pixel_values is None and b.image_features.shape == (n_img, K, W)
        assert b.samples <= n_img <= b.samples + 1


def _png():
    from tests.datagen import png_bytes

    return png_bytes()


def test_encode_clip_features_for_a_peer(tmp_path, monkeypatch):
    """--clip tiny --clip-features method:<peer> writes what that peer's front end computes from the pixels."""
    monkeypatch.setenv("PILL_TINY_DIR", str(tmp_path / "tiny"))
    build_demo(DemoConfig(n_train=4, n_val=0, image_size=64), tmp_path / "px", max_samples=4)
    args = [
        "--shards",
        str(tmp_path / "px" / "train-000000.tar"),
        "--clip",
        "tiny",
        "--clip-features",
        "method:lavin",
        "--out",
        str(tmp_path / "ft"),
        "--no-progress",
    ]
    assert main(args) == 0
    idx = json.loads((tmp_path / "ft" / "train-index.json").read_text())
    feats = clip_features(load_clip("tiny"), "method:lavin")
    assert idx["vpg"].startswith("clip:tiny:cls:") and idx["num_query_tokens"] == feats.num_query_tokens
    with tarfile.open(tmp_path / "ft" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    with tarfile.open(tmp_path / "px" / "train-000000.tar") as tar:
        src = {m.name: tar.extractfile(m).read() for m in tar}
    feat = torch.from_numpy(np.load(io.BytesIO(members["train_000000.feat.npy"]))).float()
    mean, std = default_mean_std()
    ref = feats(normalise([decode_image(src["train_000000.png"], feats.image_size)], mean, std, feats.image_size))[0]
    assert feat.shape == ref.shape
    torch.testing.assert_close(feat, ref, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="--clip and --clip-features"):
        main(["--shards", str(tmp_path / "px" / "train-000000.tar"), "--clip", "tiny", "--out", str(tmp_path / "x")])
