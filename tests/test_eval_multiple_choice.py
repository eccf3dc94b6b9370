"""Multiple-choice evaluation end to end with the tiny model: demo shards and a hand-made ScienceQA set."""

import json

import pytest
from PIL import Image

from pipeline.data.eval import default_data_config, eval_batches, shard_prompts
from pipeline.data.prompt_cut import iter_prompts
from pipeline.eval.multiple_choice import evaluate_multiple_choice, letter_token_ids

K = 8  # the tiny VPG's query tokens


@pytest.fixture(scope="module")
def model(tiny_dirs):
    from pipeline.model import PILLConfig, load_pill

    return load_pill(
        tiny_dirs["llm"], tiny_dirs["vpg"], cfg=PILLConfig(stage=2, rank=4, num_query_tokens=K, vpg_width=64)
    ).eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from shards.demo import main as demo_main

    out = tmp_path_factory.mktemp("demo")
    demo_main(
        [
            "--out",
            str(out),
            "--n-train",
            "4",
            "--n-val",
            "10",
            "--max-samples",
            "6",
            "--image-size",
            "32",
            "--no-progress",
        ]
    )
    return str(out / "val-index.json")


def test_prompt_is_the_training_prompt(model, demo):
    """The cut prompt is token for token the data pipeline's generation prompt; the answer follows it."""
    from pipeline.data.prompts import render
    from pipeline.data.tokenize import encode_prompt

    cfg = default_data_config(num_query_tokens=K, batch_size=4)
    prompts = list(iter_prompts(eval_batches(demo, model.tokenizer, cfg), K))
    assert len(prompts) == 10
    # the two ways in (cut from training batches / pipeline.data's eval samples) give the same prompts
    direct = shard_prompts(demo, model, cfg)
    assert [(p.key, p.input_ids, p.modality_mask) for p in direct] == [
        (p.key, p.input_ids, p.modality_mask) for p in prompts
    ]
    assert all(a.images.equal(b.images) for a, b in zip(direct, prompts))
    prefix, letters = letter_token_ids(model.tokenizer, 4)
    for p in prompts:
        enc = encode_prompt(render(p.meta, None, "scienceqa", True, cfg), model.tokenizer, K)
        assert p.input_ids == enc.input_ids.tolist() and p.modality_mask == enc.modality_mask.tolist()
        assert sum(p.modality_mask) == K and p.images.shape == (1, 3, 224, 224)
        # logit scoring reads the letter where the training answer has it
        assert p.answer_ids[: len(prefix) + 1] == prefix + [letters[p.meta["answer"]]]
        assert model.tokenizer.decode(p.input_ids).rstrip().endswith("[/INST]")


def test_without_images_renders_na(model, demo):
    ps = shard_prompts(demo, model, default_data_config(num_query_tokens=K), drop_images=True, limit=3)
    assert len(ps) == 3 and all(p.images is None and not any(p.modality_mask) for p in ps)
    assert "Image:N/A." in model.tokenizer.decode(ps[0].input_ids)


@pytest.mark.parametrize("mode", ["generate", "logits"])
@pytest.mark.parametrize("drop_images", [False, True])
def test_evaluate_demo(model, demo, tmp_path, mode, drop_images):
    cfg = default_data_config(num_query_tokens=K, batch_size=4)
    batches = eval_batches(demo, model.tokenizer, cfg)
    s = evaluate_multiple_choice(
        model,
        batches,
        mode=mode,
        drop_images=drop_images,
        data_cfg=cfg,
        max_new_tokens=4,
        predictions_path=tmp_path / "p.jsonl",
    )
    assert s["n"] == 10 and s["images"] == ("without" if drop_images else "with")
    assert 0 <= s["accuracy"] <= 100 and 0 < s["chance"] < 100
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    if mode == "logits":
        assert s["unparsed"] == 0  # always picks an option
    else:
        assert s["unparsed"] == sum(r["pred"] is None for r in rows)
    assert sum(v["n"] for k, v in s["categories"].items() if k.startswith("qtype:")) == 10
    assert len(rows) == 10 and {"key", "answer", "pred", "generation", "categories"} <= set(rows[0])
    assert not model.training


def _sqa_source(root):
    """A hand-made problems.json / pid_splits.json / images tree in ScienceQA's release layout."""
    problems = {
        "1": {
            "question": "Which is a mammal?",
            "choices": ["dog", "trout"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade3",
            "lecture": "L",
            "solution": "S",
        },
        "2": {
            "question": "Which state is north?",
            "choices": ["Ohio", "Texas", "Utah"],
            "answer": 0,
            "hint": "Look at the map.",
            "image": None,
            "subject": "social science",
            "grade": "grade8",
            "lecture": "",
            "solution": "",
        },
        "3": {
            "question": "Which word is a noun?",
            "choices": ["run", "cat"],
            "answer": 1,
            "hint": "",
            "image": None,
            "subject": "language science",
            "grade": "grade11",
            "lecture": "",
            "solution": "",
        },
    }
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"]}))
    (root / "images" / "test" / "1").mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 200, 0)).save(root / "images" / "test" / "1" / "image.png")


def test_scienceqa_cli(tiny_dirs, model, tmp_path, capsys):
    from pipeline.eval.scienceqa import main
    from shards.scienceqa import main as build

    _sqa_source(tmp_path)
    build(
        [
            "--problems",
            str(tmp_path / "problems.json"),
            "--pid-splits",
            str(tmp_path / "pid_splits.json"),
            "--images",
            str(tmp_path / "images"),
            "--split",
            "test",
            "--out",
            str(tmp_path / "shards"),
        ]
    )
    export = model.save_adapter(tmp_path / "export")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "--llm",
                str(tiny_dirs["llm"]),
                "--vpg",
                str(tiny_dirs["vpg"]),
                "--adapter",
                str(export),
                "--shards",
                str(tmp_path / "shards"),
                "--out-dir",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    cats = {c: v["n"] for c, v in scores["categories"].items()}
    assert cats == {"NAT": 1, "SOC": 1, "LAN": 1, "TXT": 1, "IMG": 1, "NO": 1, "G1-6": 1, "G7-12": 2}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    table = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Average |" in table
    assert "| n | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 2 | 3 |" in table


def test_scienceqa_cli_bad_input(tiny_dirs, tmp_path):
    from pipeline.eval.scienceqa import main

    with pytest.raises(FileNotFoundError, match="adapter export: .* does not exist"):
        main(["--llm", str(tiny_dirs["llm"]), "--adapter", str(tmp_path), "--shards", "x.tar", "--out-dir", "o"])


def test_prompts_from_batch_rules():
    import torch

    from pipeline.data.prompt_cut import prompts_from_batch
    from pipeline.model.batch import Batch

    ids = torch.tensor([[1, 0, 0, 7, 8, 9, 2], [1, 7, 8, 9, 2, 3, 3]])
    labels = torch.tensor([[-100, -100, -100, -100, 8, 9, 2], [-100, -100, -100, 9, 2, -100, -100]])
    mm = torch.tensor([[False, True, True, False, False, False, False], [False] * 7])
    attn = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    batch = Batch(
        input_ids=ids,
        labels=labels,
        modality_mask=mm,
        attention_mask=attn,
        image_features=torch.zeros(1, 2, 4),
        meta=({"key": "a"}, {"key": "b"}),
    )
    a, b = prompts_from_batch(batch, num_query_tokens=2)
    assert (a.input_ids, a.answer_ids, a.images.shape[0]) == ([1, 0, 0, 7], [8, 9, 2], 1)
    assert (b.input_ids, b.answer_ids, b.images) == ([1, 7, 8], [9, 2], None)
    with pytest.raises(ValueError, match="unpacked"):
        prompts_from_batch(batch.replace(cu_seqlens=torch.tensor([0, 7])), 2)
    with pytest.raises(ValueError, match="not a multiple of K=3"):
        prompts_from_batch(batch, 3)
    with pytest.raises(ValueError, match="no labels"):
        prompts_from_batch(Batch(input_ids=ids, modality_mask=mm), 2)
    dummy = Batch(
        input_ids=torch.tensor([[1, 2]]),
        labels=torch.tensor([[-100, 2]]),
        modality_mask=torch.zeros(1, 2, dtype=torch.bool),
        pixel_values=torch.empty(0, 3, 8, 8),
        meta=({"dummy": True},),
    )
    assert prompts_from_batch(dummy, 2) == []
