"""Text retention at init: PILL (stage 2, zero gate and experts) answers every text prompt as the frozen LLM."""

from __future__ import annotations

import torch

from pipeline.eval.retention import load_text_prompts, markdown, text_retention
from pipeline.model import PILLConfig, load_pill


def test_the_shipped_prompts():
    prompts = load_text_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts) and all("<image>" not in p for p in prompts)


def test_at_init_retention_is_total_and_moves_when_the_experts_do(tiny_dirs):
    model = load_pill(
        tiny_dirs["llm"], None, PILLConfig(stage=2, rank=4, vpg_width=64, num_query_tokens=8), dtype=torch.float32
    )
    texts = load_text_prompts(limit=4)
    r = text_retention(model, texts, max_new_tokens=8, batch_size=2)
    assert r["identical"] == 100.0 and r["n_prompts"] == 4 and r["n_tokens"] > 0
    assert abs(r["mean_kl"]) < 1e-6
    assert "| 100.0% |" in markdown({"init": r})
    with torch.no_grad():  # the text expert acts on text tokens: the answers move away from the frozen LLM's
        for block in model.blocks:
            block.adapter_t.u.weight.normal_(0, 0.5)
    moved = text_retention(model, texts, max_new_tokens=8, batch_size=2, frozen=r["frozen"])
    assert moved["mean_kl"] > 1e-3


def test_on_by_default_unless_the_llm_is_tiny(tmp_path):
    from pipeline.training.config import TrainConfig
    from pipeline.training.evaluate import retention_enabled, stage_exports

    cfg = TrainConfig(output_dir=str(tmp_path))
    cfg.model.llm_path = "tiny"
    assert not retention_enabled(cfg)
    cfg.model.llm_path = "smollm2"
    assert retention_enabled(cfg)
    cfg.eval.text_retention = False
    assert not retention_enabled(cfg)
    for stage in ("stage1", "stage2"):
        (tmp_path / stage / "export").mkdir(parents=True)
    assert list(stage_exports(cfg, tmp_path / "stage2" / "export")) == ["stage1", "stage2"]
