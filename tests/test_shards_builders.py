"""The real-data builders on fabricated miniature inputs: fields kept, bad samples skipped and counted, bad
arguments rejected with the file and field named before any work."""

import json
import subprocess
import sys

import pytest

from shards import llava_instruct, llava_pretrain, scienceqa
from tests.datagen import png_bytes, read_tar_samples


@pytest.mark.parametrize("mod", ["llava_pretrain", "scienceqa", "llava_instruct", "demo", "encode", "demo_probe"])
def test_help(mod):
    res = subprocess.run([sys.executable, "-m", f"shards.{mod}", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr[-2000:]


def _pretrain_inputs(tmp_path):
    img = tmp_path / "images"
    (img / "sub").mkdir(parents=True)
    (img / "sub" / "a.jpg").write_bytes(png_bytes(fmt="JPEG"))
    (img / "sub" / "b.png").write_bytes(png_bytes())
    (img / "sub" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (img / "sub" / "e.jpg").write_bytes(png_bytes(fmt="JPEG"))
    recs = [
        {
            "id": "a.1",
            "image": "sub/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "a red square"},
            ],
        },
        {
            "id": "b",
            "image": "sub/b.png",
            "conversations": [{"from": "human", "value": "Say.\n<image>"}, {"from": "gpt", "value": "another"}],
        },
        {
            "id": "m",
            "image": "sub/missing.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "bad",
            "image": "sub/bad.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "e",
            "image": "sub/e.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "  "}],
        },
    ]
    js = tmp_path / "chat.json"
    js.write_text(json.dumps(recs))
    return js, img


def test_llava_pretrain(tmp_path):
    js, img = _pretrain_inputs(tmp_path)
    out = tmp_path / "out"
    assert (
        llava_pretrain.main(
            ["--json", str(js), "--images", str(img), "--out", str(out), "--no-progress", "--max-samples", "1"]
        )
        == 0
    )
    idx = json.loads((out / "llava_pretrain-index.json").read_text())
    assert idx["total_samples"] == 2
    assert idx["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_answer": 1}
    samples = {}
    for p in sorted(out.glob("*.tar")):
        samples.update(read_tar_samples(p))
    assert set(samples) == {"a_1", "b"}
    assert samples["a_1"]["txt"] == b"a red square" and "jpg" in samples["a_1"] and "png" in samples["b"]
    meta = json.loads(samples["a_1"]["json"])
    assert meta["caption"] == "a red square" and meta["has_image"] and meta["id"] == "a.1"


def test_llava_pretrain_bad_arguments(tmp_path):
    js, img = _pretrain_inputs(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        llava_pretrain.main(["--json", str(tmp_path / "nope.json"), "--images", str(img), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="wrong"):
        llava_pretrain.main(["--json", str(js), "--images", str(tmp_path / "wrong"), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="image folder"):
        llava_pretrain.main(["--json", str(js), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    recs = json.loads(js.read_text())
    del recs[1]["conversations"]
    js.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"chat.json\[1\].*conversations"):
        llava_pretrain.main(["--json", str(js), "--images", str(img), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_scienceqa(tmp_path):
    root = tmp_path / "images"
    (root / "train" / "1").mkdir(parents=True)
    (root / "train" / "1" / "image.png").write_bytes(png_bytes())
    base = {
        "hint": "h",
        "subject": "natural science",
        "grade": "grade3",
        "lecture": "L",
        "solution": "S",
        "topic": "t",
        "category": "c",
        "skill": "s",
        "task": "closed choice",
        "split": "train",
    }
    problems = {
        "1": {"question": "Q1?", "choices": ["a", "b"], "answer": 1, "image": "image.png", **base},
        "2": {"question": "Q2?", "choices": ["a", "b", "c"], "answer": 0, "image": None, **base},
        "3": {"question": "Q3?", "choices": ["a", "b"], "answer": 5, "image": None, **base},
        "4": {"question": "Q4?", "choices": ["a", "b"], "answer": 0, "image": "image.png", **base},
        "9": {"question": "other split", "choices": ["a", "b"], "answer": 0, "image": None, **base},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3", "4"], "val": ["9"]}))
    (tmp_path / "captions.json").write_text(json.dumps({"captions": {"1": "a red square"}}))
    out = tmp_path / "out"
    args = [
        "--problems",
        str(tmp_path / "problems.json"),
        "--pid-splits",
        str(tmp_path / "pid_splits.json"),
        "--images",
        str(root),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert scienceqa.main(args + ["--split", "train", "--captions", str(tmp_path / "captions.json")]) == 0
    idx = json.loads((out / "scienceqa-train-index.json").read_text())
    assert idx["total_samples"] == 2 and idx["skipped"] == {"empty_answer": 1, "missing_image": 1}
    s = read_tar_samples(out / "scienceqa-train-000000.tar")
    m1, m2 = json.loads(s["sqa_1"]["json"]), json.loads(s["sqa_2"]["json"])
    for f in (
        "question",
        "choices",
        "answer",
        "hint",
        "subject",
        "grade",
        "lecture",
        "solution",
        "topic",
        "category",
        "skill",
        "has_image",
        "split",
        "qid",
    ):
        assert f in m1, f
    assert m1["has_image"] and m1["caption"] == "a red square" and "png" in s["sqa_1"]
    assert not m2["has_image"] and set(s["sqa_2"]) == {"json"}
    with pytest.raises(ValueError, match="no split 'test'"):
        scienceqa.main(args + ["--split", "test"])
    problems["2"].pop("lecture")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=r"problems.json\['2'\].*lecture"):
        scienceqa.main(args + ["--split", "train"])


def test_llava_instruct(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "x.jpg").write_bytes(png_bytes(fmt="JPEG"))
    conv = [
        {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A."},
        {"from": "human", "value": "And?"},
        {"from": "gpt", "value": "B."},
    ]
    recs = [
        {"id": "1", "image": "x.jpg", "conversations": conv},
        {"id": "1", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]},
        {"id": "3", "conversations": [{"from": "gpt", "value": "wrong order"}, {"from": "human", "value": "x"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    ]
    (tmp_path / "mix.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    assert (
        llava_instruct.main(
            ["--json", str(tmp_path / "mix.json"), "--images", str(img), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    idx = json.loads((out / "llava_instruct-index.json").read_text())
    assert idx["total_samples"] == 2 and idx["skipped"] == {"bad_conversation": 1, "empty_answer": 1}
    s = read_tar_samples(out / "llava_instruct-000000.tar")
    assert set(s) == {"00000000_1", "00000001_1"}  # repeated ids stay distinct
    assert json.loads(s["00000000_1"]["json"])["conversations"] == conv and "jpg" in s["00000000_1"]
    assert json.loads(s["00000001_1"]["json"])["has_image"] is False


def test_scienceqa_trainval_and_minitrain_read_the_train_and_val_image_folders(tmp_path):
    root = tmp_path / "images"
    for split, qid in (("train", "1"), ("val", "2")):
        (root / split / qid).mkdir(parents=True)
        (root / split / qid / "image.png").write_bytes(png_bytes())
    base = {"hint": "", "subject": "s", "grade": "g", "lecture": "", "solution": "", "image": "image.png"}
    problems = {q: {"question": f"Q{q}?", "choices": ["a", "b"], "answer": 0, **base} for q in ("1", "2")}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(
        json.dumps({"train": ["1"], "val": ["2"], "trainval": ["1", "2"], "minitrain": ["1"]})
    )
    args = [
        "--problems",
        str(tmp_path / "problems.json"),
        "--pid-splits",
        str(tmp_path / "pid_splits.json"),
        "--images",
        str(root),
        "--no-progress",
    ]
    for split, n in (("trainval", 2), ("minitrain", 1)):
        assert scienceqa.main(args + ["--split", split, "--out", str(tmp_path / split)]) == 0
        idx = json.loads((tmp_path / split / f"scienceqa-{split}-index.json").read_text())
        assert idx["total_samples"] == n and idx["skipped"] == {}


def test_skip_examples_name_the_source_file_and_record(tmp_path):
    js, img = _pretrain_inputs(tmp_path)
    assert (
        llava_pretrain.main(["--json", str(js), "--images", str(img), "--out", str(tmp_path / "o"), "--no-progress"])
        == 0
    )
    idx = json.loads((tmp_path / "o" / "llava_pretrain-index.json").read_text())
    (example,) = idx["shards"][0]["skip_examples"]["empty_answer"]
    assert example.startswith("e: chat.json[4]")


def test_multi_image_records(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for n in ("a.jpg", "b.png"):
        (img / n).write_bytes(png_bytes(fmt="JPEG" if n.endswith("jpg") else "PNG"))
    two = [{"from": "human", "value": "<image> vs <image>: which is red?"}, {"from": "gpt", "value": "Both."}]
    recs = [
        {"id": "two", "image": ["a.jpg", "b.png"], "conversations": two},
        {
            "id": "bad",
            "image": ["a.jpg", "b.png"],
            "conversations": [{"from": "human", "value": "<image> only one marker"}, {"from": "gpt", "value": "x"}],
        },
    ]
    (tmp_path / "m.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    assert (
        llava_instruct.main(
            ["--json", str(tmp_path / "m.json"), "--images", str(img), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    idx = json.loads((out / "llava_instruct-index.json").read_text())
    assert idx["total_samples"] == 1 and idx["skipped"] == {"image_count_mismatch": 1}
    s = read_tar_samples(out / "llava_instruct-000000.tar")["00000000_two"]
    assert {"0.jpg", "1.png", "json"} == set(s)
