"""ScienceQA evaluation: ``python -m pipeline.eval.scienceqa --llm DIR --vpg DIR --adapter EXPORT --shards PATTERN``.

Runs a trained PILL over ScienceQA shards (``python -m shards.scienceqa --split test``), with the training prompt
(QCM, system message, ``Image:`` + visual tokens or ``Image:N/A.``), greedy generation, the paper's parser
(first ``The answer is ([A-Z])``), and prints the paper's Table-1 row with counts. Writes into --out-dir:
``predictions.jsonl`` (key, answer, pred, generation, categories), ``scores.json``, ``table.md``.
``--mode logits`` is the cheaper letter-logit alternative (not the paper's protocol; see multiple_choice.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli import run_cli
from pipeline.data.eval import default_data_config, iter_shard_prompts
from pipeline.data.records import SkipCounter
from pipeline.eval.multiple_choice import MODES, evaluate_multiple_choice
from pipeline.eval.sqa_scoring import markdown_table
from pipeline.generate import add_model_args, check_model_args, load_trained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a trained PILL on ScienceQA shards (paper Table 1).")
    add_model_args(p)
    p.add_argument("--shards", required=True, help="ScienceQA shards: brace pattern, dir, or *-index.json")
    p.add_argument("--out-dir", required=True, help="where predictions.jsonl, scores.json, table.md go")
    p.add_argument("--mode", choices=MODES, default="generate", help="generate = the paper's protocol (default)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="QCM-ALE answers start with 'The answer is X.'; longer only adds the explanation",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N samples only (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-option variant for unparsed outputs")
    p.add_argument("--no-images", action="store_true", help="render every prompt with 'Image:N/A.'")
    p.add_argument(
        "--sqa-format",
        choices=["QCM-A", "QCM-ALE"],
        default=None,
        help="answer format the model was trained with (default: the data pipeline's default)",
    )
    p.add_argument("--use-captions", action="store_true", help="context = hint + caption, as in training")
    p.add_argument("--system-message", default=None, help="if training used a non-default system message")
    return p


def run(args: argparse.Namespace) -> dict:
    model = load_trained(args.llm, args.adapter, args.vpg, args.attn_backend, args.device)
    overrides = {
        "num_query_tokens": model.cfg.num_query_tokens,
        "use_captions": args.use_captions,
        "prompt_format": args.prompt_format,
    }
    if args.sqa_format:
        overrides["sqa_format"] = args.sqa_format
    if args.system_message:
        overrides["system_message"] = args.system_message
    data_cfg = default_data_config(**overrides)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skips = SkipCounter()
    prompts = iter_shard_prompts(args.shards, model, data_cfg, task="scienceqa", limit=args.limit, counter=skips)
    scores = evaluate_multiple_choice(
        model,
        prompts,
        mode=args.mode,
        drop_images=args.no_images,
        data_cfg=data_cfg,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        predictions_path=out / "predictions.jsonl",
        progress=True,
    )
    scores["shards"] = args.shards
    # A skipped sample would silently shrink the denominator: report it next to the scores.
    scores["skipped"] = dict(skips.counts)
    if scores["skipped"]:
        print(f"WARNING: samples skipped by the data pipeline (not scored): {scores['skipped']}", file=sys.stderr)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    title = f"ScienceQA ({args.mode}, {'without' if args.no_images else 'with'} images)"
    (out / "table.md").write_text(markdown_table(scores, title=title))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    scores = run(args)
    print(markdown_table(scores, title="ScienceQA"))
    print(f"wrote {args.out_dir}/predictions.jsonl, scores.json, table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
