"""Several images per sample (LLaVA `image: [...]` records, tar members `0.jpg, 1.jpg` or `jpg, 1.jpg`): loader,
packing, collation and evaluation keep them in marker order; disagreeing counts are image_count_mismatch."""

import io
import json

import numpy as np
import pytest
import torch

from pipeline.data import iter_eval_samples
from pipeline.data.tarwrite import Sample, write_tar
from tests.datagen import make_loader, png_bytes, tiny_tokenizer

K = 4
RED, BLUE = (250, 0, 0), (0, 0, 250)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _chat(n_markers: int, **extra) -> bytes:
    text = " and ".join(["<image>"] * n_markers) + ": which colours?"
    return json.dumps(
        {
            "source": "llava_instruct",
            "has_image": True,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Red, then blue."}],
            **extra,
        }
    ).encode()


def _npy(v: float) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.full((K, 6), v, dtype=np.float16))
    return buf.getvalue()


@pytest.fixture
def shard(tmp_path):
    write_tar(
        tmp_path / "m-000000.tar",
        [
            Sample("zero_one", {"0.jpg": png_bytes(RED, fmt="JPEG"), "1.png": png_bytes(BLUE), "json": _chat(2)}),
            Sample(
                "plain_one", {"jpg": png_bytes(RED, fmt="JPEG"), "1.jpg": png_bytes(BLUE, fmt="JPEG"), "json": _chat(2)}
            ),
            Sample("mismatch", {"0.png": png_bytes(RED), "1.png": png_bytes(BLUE), "json": _chat(1)}),
            Sample(
                "listed", {"0.png": png_bytes(RED), "1.png": png_bytes(BLUE), "json": _chat(3, image=["a", "b", "c"])}
            ),
            Sample("single", {"png": png_bytes(RED), "json": _chat(0)}),  # LLaVA: a missing marker goes in front
        ],
    )
    return str(tmp_path / "m-000000.tar")


@pytest.mark.parametrize("pack", [False, True])
def test_images_follow_their_markers_through_collation_and_packing(tok, shard, pack):
    ld = make_loader(
        tok,
        shard,
        task="chat",
        batch_size=5,
        num_query_tokens=K,
        num_workers=0,
        shuffle_buffer=0,
        shuffle_shards=False,
        pack=pack,
    )
    (b,) = list(ld)
    assert [m["key"] for m in b.meta] == ["zero_one", "plain_one", "single"]
    assert ld.skipped() == {"image_count_mismatch": 2}
    px = b.pixel_values
    assert px.shape == (5, 3, 224, 224) and int(b.modality_mask.sum()) == 5 * K
    red = px[:, 0].mean((1, 2)) > px[:, 2].mean((1, 2))
    assert red.tolist() == [True, False, True, False, True]  # image i of a sample = its i-th marker
    if pack:
        cu = b.cu_seqlens.tolist()
        per_row = [int(b.modality_mask[0, a:e].sum()) // K for a, e in zip(cu, cu[1:])]
    else:
        per_row = (b.modality_mask.sum(1) // K).tolist()
    assert per_row == [2, 2, 1]


def test_feature_shards_with_several_images(tok, tmp_path):
    write_tar(
        tmp_path / "f-000000.tar", [Sample("f", {"0.feat.npy": _npy(1), "1.feat.npy": _npy(2), "json": _chat(2)})]
    )
    (b,) = list(
        make_loader(
            tok,
            str(tmp_path / "f-000000.tar"),
            task="chat",
            batch_size=1,
            num_query_tokens=K,
            num_workers=0,
            shuffle_buffer=0,
        )
    )
    assert b.image_features.shape == (2, K, 6) and b.image_features[:, 0, 0].tolist() == [1.0, 2.0]


def test_evaluation_prompts_carry_every_image(tok, shard, tiny_dirs):
    from pipeline.data import DataConfig

    samples = list(iter_eval_samples(shard, tok, DataConfig(), K, task="chat"))
    assert [s["meta"]["key"] for s in samples] == ["zero_one", "plain_one", "single"]
    assert [s["pixel_values"].shape[0] for s in samples] == [2, 2, 1]
    assert [int(s["modality_mask"].sum()) for s in samples] == [2 * K, 2 * K, K]


def test_a_two_image_prompt_generates(tiny_dirs, tmp_path):
    """The model reads several images at their positions: a two-image chat prompt runs through generate, whose one
    prompt forward hands the VPG exactly those two images (pixels, in marker order), and each image changes what the
    prompt computes (the order too: each image sits at its own marker)."""
    from pipeline.data.eval import chat_prompt
    from pipeline.generate import GenerationConfig, generate
    from pipeline.model import PILLConfig, load_pill
    from pipeline.model.batch import Batch
    from tests.test_model_pill import randomize

    model = load_pill(
        tiny_dirs["llm"], tiny_dirs["vpg"], cfg=PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64)
    ).eval()
    randomize(model)  # no image path hidden behind a zero-init gate or adapter
    g = torch.Generator().manual_seed(0)
    size = model.vpg.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    p = chat_prompt(model, "<image> or <image>?", images)
    assert sum(p.modality_mask) == 2 * 8
    seen: list[torch.Tensor] = []
    hook = model.vpg.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    try:
        (text,) = generate(model, [p], GenerationConfig(max_new_tokens=2), 1)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], images.to(seen[0].dtype))  # both images, in marker order

    @torch.no_grad()
    def last_hidden(imgs: torch.Tensor) -> torch.Tensor:
        q = chat_prompt(model, "<image> or <image>?", imgs)
        batch = Batch(
            input_ids=torch.tensor([q.input_ids]), modality_mask=torch.tensor([q.modality_mask]), pixel_values=imgs
        )
        return model(batch).hidden[0, -1]

    base = last_hidden(images)
    other_second = images.clone()
    other_second[1] = torch.randn(3, size, size, generator=g)
    assert not torch.allclose(base, last_hidden(other_second), atol=1e-5)  # the second image is read
    assert not torch.allclose(base, last_hidden(images.flip(0)), atol=1e-5)  # each at its own marker


def test_a_literal_marker_in_scienceqa_text_is_not_an_image(tok, tmp_path):
    """The ScienceQA template places the images; '<image>' typed into a question stays text."""
    from tests.datagen import sqa_meta

    write_tar(
        tmp_path / "q-000000.tar",
        [
            Sample(
                "q", {"png": png_bytes(), "json": json.dumps(sqa_meta(0, question="What does <image> show?")).encode()}
            )
        ],
    )
    (b,) = list(
        make_loader(
            tok, str(tmp_path / "q-000000.tar"), batch_size=1, num_query_tokens=K, num_workers=0, shuffle_buffer=0
        )
    )
    assert b.pixel_values.shape[0] == 1 and int(b.modality_mask.sum()) == K
