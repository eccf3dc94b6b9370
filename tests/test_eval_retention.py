"""Text retention: at init PILL (stage 2, zero gate and experts) answers every text prompt as the frozen LLM; the
retention CLI on any method's export and any prompt file gives what an independent computation gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data.eval import chat_prompt
from pipeline.eval.retention import load_text_prompts, main, markdown, text_retention
from pipeline.model import PILLConfig, get_method, load_export, load_pill
from pipeline.model.batch import Batch


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


# ---- the CLI: any method's export, any prompt file ------------------------------------------------------------------
def _prompt_file(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _export(tiny_dirs, tmp_path, method: str, std: float) -> Path:
    """A stage-2 export of `method` on the tiny LLM, its trainables N(0, std) (0: as initialised)."""
    spec = get_method(method)
    cfg = PILLConfig(stage=2, rank=4, vpg_width=64, num_query_tokens=8) if method == "pill" else spec.config_cls()
    torch.manual_seed(0)
    model = spec.load(tiny_dirs["llm"], None, cfg, dtype=torch.float32)
    if std:
        with torch.no_grad():
            for _, p in model.trainable_parameters():
                p.normal_(0, std)
    return model.save_adapter(tmp_path / f"{method}_export")


def _cli(tiny_dirs, export, prompts, out, *extra) -> dict:
    argv = ["--llm", str(tiny_dirs["llm"]), "--adapter", str(export), "--prompts", str(prompts)]
    assert main([*argv, "--out-dir", str(out), "--max-new-tokens", "6", "--batch-size", "3", *extra]) == 0
    return json.loads((out / "retention.json").read_text())


def _independent(tiny_dirs, export, texts, n_new: int) -> tuple[float, float]:
    """identical % and mean KL recomputed without pipeline.eval.retention: transformers' greedy generate on the
    frozen LLM (one prompt at a time) as the reference, the export's uncached greedy decoding as the trained."""
    llm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"], dtype=torch.float32).eval()
    trained = load_export(export, tiny_dirs["llm"], None, dtype=torch.float32).eval()
    eos = trained.tokenizer.eos_token_id
    same, kl_sum, n_tok = 0, 0.0, 0
    for text in texts:
        ids = torch.as_tensor([chat_prompt(trained, text).input_ids])
        ref = llm.generate(input_ids=ids, max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
        ref = ref[0, ids.shape[1] :].tolist()
        answer = ref[: ref.index(eos) + 1] if eos in ref else ref  # the stop token's prediction counts too
        ours = ids
        for _ in range(n_new):
            nxt = int(trained.output_logits(trained(Batch(input_ids=ours)))[0, -1].argmax())
            if nxt == eos:
                break
            ours = torch.cat([ours, torch.tensor([[nxt]])], 1)
        same += ours[0, ids.shape[1] :].tolist() == [t for t in answer if t != eos]
        full = torch.cat([ids, torch.as_tensor([answer])], 1)
        with torch.no_grad():
            lp_f = torch.log_softmax(llm(full).logits.float(), -1)[0, ids.shape[1] - 1 : -1]
            lp_t = torch.log_softmax(trained.output_logits(trained(Batch(input_ids=full))).float(), -1)
        lp_t = lp_t[0, ids.shape[1] - 1 : -1]
        kl_sum += float((lp_f.exp() * (lp_f - lp_t)).sum(-1).clamp(min=0).sum())
        n_tok += len(answer)
    return 100.0 * same / len(texts), kl_sum / n_tok


def test_cli_on_a_trained_export_matches_an_independent_computation(tiny_dirs, tmp_path):
    texts = load_text_prompts(limit=5)
    prompts = _prompt_file(tmp_path / "p.jsonl", texts)
    export = _export(tiny_dirs, tmp_path, "pill", std=0.05)
    r = _cli(tiny_dirs, export, prompts, tmp_path / "out")
    identical, mean_kl = _independent(tiny_dirs, export, texts, 6)
    assert r["reference"] == "adapters_off" and r["n_prompts"] == 5 and r["units"]["mean_kl"] == "nats per token"
    assert r["identical"] == pytest.approx(identical) and r["mean_kl"] == pytest.approx(mean_kl, rel=1e-4)
    assert mean_kl > 1e-4 and (tmp_path / "out" / "retention.md").is_file()
    assert r["examples"][0]["prompt"] == texts[0] and r["prompts"] == str(prompts)


@pytest.mark.parametrize("method", ["pill", "llama_adapter", "lavin", "excitor", "iaa"])
def test_cli_any_method_at_init_is_the_frozen_llm_and_both_references_agree(tiny_dirs, tmp_path, method):
    """At init every method is its frozen LLM; trained, the adapters_off reference and transformers' own LLM give
    the same figures."""
    prompts = _prompt_file(tmp_path / "p.jsonl", load_text_prompts(limit=3))
    r0 = _cli(tiny_dirs, _export(tiny_dirs, tmp_path / "init", method, 0), prompts, tmp_path / "o0")
    assert r0["identical"] == 100.0 and r0["mean_kl"] < 1e-6
    trained = _export(tiny_dirs, tmp_path / "trained", method, 0.3)
    off = _cli(tiny_dirs, trained, prompts, tmp_path / "o1", "--reference", "adapters_off")
    llm = _cli(tiny_dirs, trained, prompts, tmp_path / "o2", "--reference", "llm")
    assert off["identical"] == llm["identical"] and off["mean_kl"] == pytest.approx(llm["mean_kl"], rel=1e-4, abs=1e-6)


def test_cli_a_bad_prompt_file_exits_2_naming_file_and_line(tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    rc = main(["--llm", str(tiny_dirs["llm"]), "--prompts", str(bad), "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and f"{bad}:2:" in capsys.readouterr().err and not (tmp_path / "o").exists()
