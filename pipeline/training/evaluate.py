"""End-of-run held-out evaluation, from the exported weights, without DeepSpeed.

Global rank 0 rebuilds the frozen LLM/VPG, loads <stage dir>/export (adapter_model.safetensors) and runs
pipeline.eval's multiple-choice evaluator twice: with the images and with every image removed (the prompt
re-rendered as "Image:N/A."). The gap between the two says the model uses the image. Going through the export
(not the engine's module) also proves the export is complete and loadable on its own. The other ranks wait, and
raise too when rank 0's evaluation raised.

Then, unless the LLM is the random `tiny` one (eval.text_retention), text retention (pipeline.eval.retention) of
every stage's export against the frozen LLM: after stage 1 and after stage 2, so what each stage costs the LLM's
own text ability is in eval.json ("text_retention") and eval.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.data.eval import default_data_config, shard_prompts
from pipeline.eval import retention
from pipeline.eval.multiple_choice import evaluate_multiple_choice
from pipeline.eval.sqa_scoring import markdown_table
from pipeline.model import load_export
from pipeline.model.frozen import TINY
from pipeline.training.config import TrainConfig
from pipeline.training.dist import DistContext, all_agree_any, host_cores


def evaluate_export(
    cfg: TrainConfig, export_dir: str | Path, ctx: DistContext, llm_path: str, vpg_path: str | None
) -> dict[str, Any] | None:
    result, error = None, None
    if ctx.is_main:
        try:
            with host_cores(ctx.device):
                result = _evaluate(cfg, Path(export_dir), llm_path, vpg_path)
        except Exception as e:  # re-raised below, once every rank knows
            error = e
    # The collective is the barrier and carries rank 0's outcome: with a bare barrier a failed rank 0 would leave
    # the others waiting there (NCCL never tells them; gloo only when rank 0's process is gone).
    if all_agree_any(error is not None, ctx.device):
        if error is not None:
            raise error
        raise RuntimeError(f"the held-out evaluation of {export_dir} failed on global rank 0 (its log has the error)")
    return result


def _evaluate(cfg: TrainConfig, export_dir: Path, llm: str, vpg: str | None) -> dict[str, Any]:
    s = cfg.stages[-1]
    device = torch.device("cuda") if torch.cuda.is_available() else None
    model = load_export(
        export_dir, llm, vpg, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device=device
    )
    model.eval()
    data_cfg = default_data_config(
        max_length=cfg.data.max_length,
        num_query_tokens=model.cfg.num_query_tokens,
        sqa_format=cfg.data.sqa_format,
        use_captions=cfg.data.use_captions,
        prompt_format=cfg.data.prompt_format,
    )
    out_dir = Path(cfg.output_dir)
    prompts = shard_prompts(s.eval_shards, model, data_cfg, limit=cfg.eval.max_samples, batch_size=cfg.eval.batch_size)
    kw = dict(mode=cfg.eval.mode, data_cfg=data_cfg, batch_size=cfg.eval.batch_size, seed=cfg.seed)
    with_img = evaluate_multiple_choice(model, prompts, predictions_path=out_dir / "eval_predictions.jsonl", **kw)
    no_img = evaluate_multiple_choice(
        model, prompts, drop_images=True, predictions_path=out_dir / "eval_predictions_no_image.jsonl", **kw
    )
    result = {
        "accuracy": with_img["accuracy"],
        "accuracy_no_image": no_img["accuracy"],
        "chance": with_img["chance"],
        "n": with_img["n"],
        "units": "percent",
        "mode": cfg.eval.mode,
        "export": str(export_dir),
        "eval_shards": s.eval_shards,
        "llm_path": llm,
        "vpg_path": vpg,
        "with_image": with_img,
        "without_image": no_img,
    }
    tables = (
        markdown_table(with_img, "Held-out evaluation, with images")
        + "\n"
        + markdown_table(no_img, "Held-out evaluation, images removed (Image:N/A.)")
    )
    if retention_enabled(cfg):
        del model  # one LLM copy at a time
        result["text_retention"] = stage_retention(cfg, export_dir, llm, vpg)
        tables += "\n" + retention.markdown(result["text_retention"])
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "eval.md").write_text(tables)
    print(tables, flush=True)
    print(
        f"held-out accuracy: {result['accuracy']:.1f}% with images, {result['accuracy_no_image']:.1f}% with "
        f"images removed (chance {result['chance']:.1f}%, n={result['n']}, {cfg.eval.mode})",
        flush=True,
    )
    return result


def retention_enabled(cfg: TrainConfig) -> bool:
    on = cfg.eval.text_retention
    return str(cfg.model.llm_path) != TINY if on is None else on


def stage_exports(cfg: TrainConfig, last_export: Path) -> dict[str, Path]:
    """{stage dir name: export} for every stage of this run that wrote one (a multi-stage run: <out>/stage*/)."""
    found = {p.parent.name: p for p in sorted(Path(cfg.output_dir).glob("*/export")) if p.is_dir()}
    return found if last_export in found.values() else {**found, last_export.parent.name: last_export}


def stage_retention(cfg: TrainConfig, last_export: Path, llm: str, vpg: str | None) -> dict[str, dict]:
    """Text retention of each stage's export; the frozen LLM's answers are generated once and reused."""
    texts = retention.load_text_prompts(limit=cfg.eval.text_retention_prompts)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    device = torch.device("cuda") if torch.cuda.is_available() else None
    out, frozen = {}, None
    for name, export in stage_exports(cfg, last_export).items():
        model = load_export(export, llm, vpg, dtype=dtype, device=device)
        r = retention.text_retention(
            model, texts, batch_size=cfg.eval.batch_size, prompt_format=cfg.data.prompt_format, frozen=frozen
        )
        frozen = r.pop("frozen")
        out[name] = r
        print(
            f"text retention after {name}: {r['identical']:.1f}% identical greedy answers, mean KL "
            f"{r['mean_kl']:.4g} nats/token over {r['n_tokens']} tokens of {r['n_prompts']} prompts",
            flush=True,
        )
        del model
    return out
