"""A text-only record with `conversations` is a chat sample (its answer trained), never a caption skipped for its
missing image: stage 2 mixes text-only instructions (LLaVA-mix665k's ShareGPT part, replay sets) with image ones."""

import json

import pytest

from pipeline.data import DataConfig, detect_task, render
from pipeline.data.tarwrite import Sample, write_tar
from pipeline.model.batch import IGNORE_INDEX
from tests.datagen import make_loader, png_bytes, tiny_tokenizer

ANSWER = "Paris is the capital of France."


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    "meta, task",
    [
        ({"id": "t", "conversations": _conv("What is the capital of France?", ANSWER)}, "chat"),
        ({"id": "t", "image": None, "conversations": _conv("Hi?", "Hello.")}, "chat"),
        ({"id": "t", "has_image": False, "conversations": _conv("Hi?", "Hello.")}, "chat"),
        # LLaVA's pretraining records (one human + one gpt turn about an image) stay captions
        ({"id": "c", "image": "a/b.jpg", "conversations": _conv("<image>\nDescribe.", "A dog.")}, "caption"),
        ({"id": "c", "has_image": True, "conversations": _conv("<image>\nDescribe.", "A dog.")}, "caption"),
        ({"id": "c"}, "caption"),
    ],
)
def test_detect_task_reads_a_text_only_conversation_as_chat(meta, task):
    assert detect_task(meta) == task


def test_a_text_only_conversation_in_a_shard_is_a_chat_sample_with_its_answer_labels(tok, tmp_path):
    text_only = {"id": "t0", "conversations": _conv("What is the capital of France?", ANSWER)}
    captioned = {"id": "c0", "image": "c0.png", "conversations": _conv("<image>\nDescribe.", "A red square.")}
    write_tar(
        tmp_path / "mix-000000.tar",
        [
            Sample("t0", {"json": json.dumps(text_only).encode()}),
            Sample("c0", {"png": png_bytes(), "json": json.dumps(captioned).encode()}),
        ],
    )
    ld = make_loader(tok, str(tmp_path / "mix-000000.tar"), task="auto", batch_size=2, num_workers=0, shuffle_buffer=0)
    batches = list(ld)
    assert ld.skipped() == {}
    rows = {m["key"]: (i, m) for b in batches for i, m in enumerate(b.meta)}
    assert sorted(rows) == ["c0", "t0"]
    (batch,) = batches
    i, meta = rows["t0"]
    assert meta["task"] == "chat"
    assert not batch.modality_mask[i].any()  # no visual position in the text-only row
    labels = batch.labels[i]
    answer = tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)
    assert answer.strip() == ANSWER
    expected = render(text_only, None, "chat", 0, DataConfig())
    assert expected.turns == [("What is the capital of France?", ANSWER)]
