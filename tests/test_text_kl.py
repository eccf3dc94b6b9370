"""loss.text_kl: KL(frozen || trained) of the next-token distributions as a LossTerm (pipeline.training.loss.TextKL).

Against an independent computation (transformers' forward of the frozen LLM loaded separately, F.kl_div on the
method's own logits at positions written out by hand), 0 at init, refused for a method without adapters_off, and
a short training run with it stays closer to the frozen LLM on text than the same run without it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline.model import METHODS, PILLConfig, get_method, load_method, register
from pipeline.model.batch import IGNORE_INDEX, Batch
from pipeline.training.config import ConfigError, LossConfig, ModelConfig, StageConfig, TextKLConfig, TrainConfig
from pipeline.training.loss import AnswerCrossEntropy, Loss, TextKL, text_positions, training_loss
from tests.test_peers_models import clip_dir, randomize  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """tests/test_mixed_ranks.py's data: demo ScienceQA shards and text-only chat shards."""
    from shards.demo import DemoConfig, build_demo
    from tests.test_data_mix import write_chat_shards

    root = tmp_path_factory.mktemp("kl_mixed")
    build_demo(DemoConfig(n_train=32, n_val=8, seed=0), root / "data", max_samples=16)
    write_chat_shards(root / "chat", 2, 6)
    return root


K = 4  # visual tokens per image (PILL's num_query_tokens here)
T, PAD = 30, 5  # row 1 (text only) has its last PAD positions padded


def pill(tiny_dirs):
    torch.manual_seed(1)
    cfg = PILLConfig(stage=2, rank=4, vpg_width=32, num_query_tokens=K)
    return load_method("pill", tiny_dirs["llm"], None, cfg, dtype=torch.float32)


def iaa(tiny_dirs, clip):
    torch.manual_seed(1)
    return load_method("iaa", tiny_dirs["llm"], clip, get_method("iaa").config_cls(), dtype=torch.float32)


def two_rows(model, seed: int = 0) -> Batch:
    """Row 0: one image (placeholders at 3..3+k), answer labels at its end; row 1: text only, right-padded."""
    g = torch.Generator().manual_seed(seed)
    k = model.cfg.num_query_tokens
    n = max(T, k + 12)
    ids = torch.randint(5, 400, (2, n), generator=g)
    mm = torch.zeros_like(ids, dtype=torch.bool)
    mm[0, 3 : 3 + k] = True
    attn = torch.ones_like(ids)
    attn[1, n - PAD :] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, n - PAD - 4 : n - PAD] = ids[:, n - PAD - 4 : n - PAD]
    image = (
        {"image_features": torch.randn(1, k, model.cfg.vpg_width, generator=g)}
        if model.method == "pill"
        else {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}
    )
    return Batch(input_ids=ids, attention_mask=attn, modality_mask=mm, labels=labels, **image)


def hand_positions(batch: Batch, where: str) -> list[tuple[int, int]]:
    """(row, t) of every next-token distribution the term should compare, written out from the layout above."""
    n = batch.input_ids.shape[1]
    k = int(batch.modality_mask[0].sum())
    text_row = [(1, t) for t in range(n - PAD - 1)]  # t and t+1 both real
    if where == "text_rows":
        return text_row
    image_row = [(0, t) for t in range(n - 1) if not ({t, t + 1} & set(range(3, 3 + k)))]
    return image_row + text_row


def independent_kl(model, llm_dir, batch: Batch, where: str) -> torch.Tensor:
    frozen = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = frozen(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ours = model.output_logits(model(batch))
    rows, ts = zip(*hand_positions(batch, where))
    p, q = ref[list(rows), list(ts)], ours[list(rows), list(ts)]
    return F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="sum")


@pytest.mark.parametrize("where", ["text_rows", "all_text"])
def test_text_kl_equals_kl_div_against_transformers_frozen_llm(tiny_dirs, where):
    model = pill(tiny_dirs)
    randomize(model)
    model.eval()
    batch = two_rows(model)
    term = TextKL(where=where)
    keep = text_positions(batch, where)
    assert sorted(map(tuple, keep.nonzero().tolist())) == sorted(hand_positions(batch, where))
    assert term.count(batch) == len(hand_positions(batch, where))
    with torch.no_grad():
        got = term.total(model, model(batch), batch)
    want = independent_kl(model, tiny_dirs["llm"], batch, where)
    assert want > 1e-3, "randomised adapters should move the text distributions"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # As a loss term: normalised by its count over the (here one-micro-batch) global batch, logged on its own.
    loss = Loss((AnswerCrossEntropy(), term))
    with torch.no_grad():
        result = loss(model, model(batch), batch, loss.counts(batch), 1)
    torch.testing.assert_close(result.parts["text_kl"], want / term.count(batch), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.loss, result.parts["answer_ce"] + result.parts["text_kl"])


def test_iaa_student_uses_its_image_head_and_the_teacher_the_llm_head(tiny_dirs, clip_dir):  # noqa: F811
    """IAA's image rows predict through mm_head (head_index 1): with all_text the term compares those rows' mm_head
    logits with the frozen LLM's lm_head; the teacher forward (adapters off) must not see head_index 1."""
    model = iaa(tiny_dirs, clip_dir)
    randomize(model)
    model.eval()
    batch = two_rows(model)
    with torch.no_grad():
        out = model(batch)
        assert out.head_index is not None and out.head_index.tolist() == [1, 0]
        got = TextKL(where="all_text").total(model, out, batch)
    torch.testing.assert_close(got, independent_kl(model, tiny_dirs["llm"], batch, "all_text"), rtol=1e-4, atol=1e-6)


def test_text_kl_is_zero_at_init_and_positions_skip_dummy_rows_and_documents(tiny_dirs):
    model = pill(tiny_dirs).eval()
    batch = two_rows(model)
    with torch.no_grad():
        kl = TextKL(where="text_rows").total(model, model(batch), batch)
    assert abs(float(kl)) < 1e-5
    dummy = Batch(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long), num_samples=0)
    assert TextKL().count(dummy) == 0
    # packed: two documents of 4 and 3 tokens, the second with a visual token; no pair across the boundary
    packed = Batch(
        input_ids=torch.arange(7)[None] + 10,
        modality_mask=torch.tensor([[0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool),
        cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32),
    )
    assert text_positions(packed, "all_text")[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert text_positions(packed, "text_rows")[0].nonzero().flatten().tolist() == [0, 1, 2]
    packed2 = packed.replace(modality_mask=torch.zeros(1, 7, dtype=torch.bool))
    assert text_positions(packed2, "text_rows")[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 5]


def test_text_kl_config_refuses_a_method_without_adapters_off_before_launch(tmp_path, capsys):
    from pipeline.train import EXIT_CONFIG
    from pipeline.train import main as train_main

    spec = get_method("pill")
    no_switch = type("PILLWithoutSwitch", (spec.model_cls,), {"supports_adapters_off": False})
    register(dataclasses.replace(spec, name="pill_no_switch", model_cls=no_switch))
    try:
        stage = StageConfig(train_shards=["x.tar"], max_steps=1)
        kl = LossConfig(text_kl=TextKLConfig(weight=0.5))
        with pytest.raises(ConfigError, match="loss.text_kl.weight=0.5: method pill_no_switch has no adapters_off"):
            TrainConfig(model=ModelConfig(method="pill_no_switch"), stages=[stage], loss=kl).validate()
        TrainConfig(model=ModelConfig(method="pill_no_switch"), stages=[stage]).validate()  # weight 0: no teacher
        rc = train_main(
            ["--config", "demo", "--output-dir", str(tmp_path / "run")]
            + ["--set", "model.method=pill_no_switch"]
            + ["--set", "loss.text_kl.weight=0.1"]
        )
        assert rc == EXIT_CONFIG and "has no adapters_off() switch" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # refused before any process group, model or output
    finally:
        METHODS.pop("pill_no_switch")  # other tests list the registered methods
    TrainConfig(model=ModelConfig(method="pill"), stages=[stage], loss=kl).validate()  # pill has the switch
    for bad in (-1, float("nan"), "a lot"):
        with pytest.raises(ConfigError, match="loss.text_kl.weight"):
            TextKLConfig(weight=bad)
    assert [t.name for t in training_loss(0.0).terms] == ["answer_ce"]
    assert [t.name for t in training_loss(0.5, "all_text").terms] == ["answer_ce", "text_kl"]


def frozen_distance(model, llm, ids: torch.Tensor) -> float:
    """Mean KL(frozen || model) per position on held-out text."""
    with torch.no_grad():
        ref = F.log_softmax(llm(input_ids=ids).logits, -1)
        ours = F.log_softmax(model.output_logits(model(Batch(input_ids=ids))), -1)
    return float(F.kl_div(ours, ref, log_target=True, reduction="sum") / (ids.shape[0] * ids.shape[1]))


def short_run(tiny_dirs, kl_weight: float, steps: int = 20) -> float:
    """AdamW on the adapters, text-only rows whose answers are random tokens (pulling the LLM away from itself)."""
    model = pill(tiny_dirs)
    model.train()
    loss = training_loss(kl_weight, "text_rows")
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, 400, (4, 24), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 12:] = torch.randint(5, 400, (4, 12), generator=g)
        batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        result = loss(model, model(batch), batch, loss.counts(batch), 1)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llm"]), dtype=torch.float32).eval()
    held_out = torch.randint(5, 400, (4, 24), generator=torch.Generator().manual_seed(9))
    return frozen_distance(model.eval(), llm, held_out)


def test_a_short_run_with_the_kl_term_stays_closer_to_the_frozen_llm(tiny_dirs):
    without, with_kl = short_run(tiny_dirs, 0.0), short_run(tiny_dirs, 2.0)
    assert without > 1e-3, f"the run without the guard should move the text distributions (KL {without:.3g})"
    assert with_kl < 0.5 * without, f"KL to the frozen LLM: {with_kl:.4g} with the guard, {without:.4g} without"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method,zero", [("pill", 3), ("iaa", 2)])
def test_text_rows_kl_where_one_rank_holds_only_chat_and_the_other_only_images(mixed_dir, method, zero):
    """tests/test_mixed_ranks.py's mixed stage (rank 0: chat rows only, rank 1: image rows only) with the KL guard on
    the text-only rows: rank 1 covers no position and still runs the teacher, so ZeRO-3's gathers stay in step; the
    logged loss/text_kl is rank 0's KL over the global count of covered positions."""
    import json

    import yaml

    from tests.test_mixed_ranks import _config as mixed_config
    from tests.test_train_ds import REPO, _run

    path = mixed_config(mixed_dir, method, zero)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(name=f"kl_{method}_z{zero}", output_dir=str(mixed_dir / f"kl_{method}_z{zero}"))
    cfg["loss"] = {"text_kl": {"weight": 0.5, "where": "text_rows"}}
    path.write_text(yaml.safe_dump(cfg))
    rcs, out = _run(path, extra=["--ds_config", str(REPO / "ds_configs" / f"zero{zero}.json")])
    assert rcs == [0, 0], out[-4000:]
    rows = [json.loads(x) for x in (mixed_dir / f"kl_{method}_z{zero}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss/text_kl"] < 1e-6  # step 1 ran on the initial weights: text rows are the frozen LLM
    if method == "iaa":  # IAA routes a text-only row through the frozen LLM by design: nothing to guard
        assert rows[1]["loss/text_kl"] == 0.0
    else:
        assert rows[1]["loss/text_kl"] > 0  # after one step the adapters moved the text rows
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/answer_ce"] + 0.5 * r["loss/text_kl"], rel=1e-4)
