"""The embedded demo set: deterministic bytes, the fields evaluation needs, answers that match the picture."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from shards.demo import COLORS, DemoConfig, build_demo, main, make_scene
from tests.datagen import read_tar_samples


def test_deterministic_and_split(tmp_path):
    cfg = DemoConfig(n_train=40, n_val=12, image_size=64)
    build_demo(cfg, tmp_path / "a", max_samples=16)
    build_demo(cfg, tmp_path / "b", max_samples=16, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    val = read_tar_samples(tmp_path / "a" / "val-000000.tar")
    train = read_tar_samples(tmp_path / "a" / "train-000000.tar")
    assert len(val) == 12 and all(k.startswith("val_") for k in val)
    assert all(json.loads(s["json"])["split"] == "train" for s in train.values())
    # other seed -> other data; resume keeps nothing made with other settings
    build_demo(DemoConfig(n_train=40, n_val=12, image_size=64, seed=1), tmp_path / "a", max_samples=16)
    assert (tmp_path / "a" / "val-000000.tar").read_bytes() != (tmp_path / "b" / "val-000000.tar").read_bytes()


def test_fields_and_answers_match_the_image(tmp_path):
    cfg = DemoConfig(n_train=80, n_val=0, image_size=96)
    build_demo(cfg, tmp_path, max_samples=100)
    samples = read_tar_samples(tmp_path / "train-000000.tar")
    qtypes = set()
    for key, s in samples.items():
        m = json.loads(s["json"])
        for f in (
            "question",
            "choices",
            "answer",
            "qtype",
            "split",
            "has_image",
            "hint",
            "subject",
            "grade",
            "lecture",
            "solution",
            "caption",
        ):
            assert f in m, f
        assert 2 <= len(m["choices"]) <= 4 and 0 <= m["answer"] < len(m["choices"])
        assert len(set(m["choices"])) == len(m["choices"])
        assert s["txt"].decode() == m["caption"]
        ans = m["choices"][m["answer"]]
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(int)
        qtypes.add(m["qtype"])
        if m["qtype"] == "color":  # the answer colour is the most frequent non-background colour
            fg = img[(np.abs(img - 128).sum(-1) > 30)]
            assert np.abs(fg - np.array(COLORS[ans])).sum(-1).mean() < 10, key
        if m["qtype"] == "position":
            mask = np.abs(img - 128).sum(-1) > 30
            cx = np.nonzero(mask)[1].mean()
            assert (cx < 48) == (ans == "left"), key
        if m["qtype"] in ("color", "shape", "position"):
            assert ans in m["caption"]
    assert qtypes == {"color", "shape", "count", "position"}


def test_parametrised_and_validated(tmp_path):
    cfg = DemoConfig(n_train=20, n_val=0, qtypes=("color",), colors=("red", "blue"), max_options=2)
    _, fields, _ = make_scene(cfg, "train", 3)
    assert fields["qtype"] == "color" and sorted(fields["choices"]) == ["blue", "red"]
    with pytest.raises(ValueError, match="qtypes"):
        DemoConfig(qtypes=("smell",))
    with pytest.raises(ValueError, match="colors"):
        DemoConfig(colors=("red",))
    assert main(["--out", str(tmp_path), "--n-train", "8", "--n-val", "4", "--image-size", "48", "--no-progress"]) == 0
    assert json.loads((tmp_path / "val-index.json").read_text())["total_samples"] == 4


def test_fixed_options_make_the_letter_a_function_of_the_image():
    cfg = DemoConfig(n_train=40, n_val=0, qtypes=("color",), fixed_options=True)
    for i in range(40):
        _, fields, _ = make_scene(cfg, "train", i)
        assert fields["choices"] == list(cfg.colors)
        assert fields["choices"][fields["answer"]] in fields["solution"] if "solution" in fields else True
    shuffled = DemoConfig(n_train=40, n_val=0, qtypes=("color",))
    assert any(make_scene(shuffled, "train", i)[1]["choices"] != list(shuffled.colors) for i in range(40))
