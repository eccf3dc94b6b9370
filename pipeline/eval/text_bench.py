"""Text retention in the literature's terms: the same lm-eval tasks on the frozen LLM and on the trained model.

    python -m pipeline.eval.text_bench --tasks mmlu gsm8k --llm smollm2 --adapter runs/x/export --out text.md
    python -m pipeline.eval.text_bench --tasks my_task --include-path tasks/ --llm tiny --adapter EXPORT --limit 50

Both rows run through the lm-eval plug-in (pipeline.eval.lm_eval_plugin, `--model pill`) on the text-only path:
"frozen" without the adapter (a fresh method is the frozen LLM on text), "trained" with it. Tasks come from
lm-eval's own set or from --include-path; nothing is downloaded here that the tasks' datasets do not already have
in the local cache (set HF_DATASETS_OFFLINE=1 on an offline machine). Writes a markdown table (and JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from pipeline.eval.lm_eval_plugin import MODEL_NAME


def evaluate(args: argparse.Namespace, adapter: str | None) -> dict:
    """lm-eval's results dict ({"results": {task: {"metric,filter": value}}, ...}) of one model."""
    model_args = {"llm": args.llm, "device": args.device, "dtype": args.dtype}
    if adapter:
        model_args["adapter"] = adapter
    if args.attn_backend:
        model_args["attn_backend"] = args.attn_backend
    return simple_evaluate(
        model=MODEL_NAME,
        model_args=model_args,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path),
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def rows(frozen: dict, trained: dict) -> list[dict]:
    """One row per (task, metric) both runs report: frozen, trained and the change."""
    out = []
    for task, metrics in sorted(frozen["results"].items()):
        for key, before in sorted(metrics.items()):
            after = trained["results"].get(task, {}).get(key)
            if "," not in key or "stderr" in key or not isinstance(before, (int, float)) or after is None:
                continue
            metric, filt = key.split(",", 1)
            out.append({"task": task, "metric": metric, "filter": filt, "frozen": before, "trained": after,
                        "change": after - before})  # fmt: skip
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| task | metric | frozen LLM | trained | change |", "|---|---|---:|---:|---:|"]
    for r in table:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        lines.append(f"| {r['task']} | {metric} | {r['frozen']:.4f} | {r['trained']:.4f} | {r['change']:+.4f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="lm-eval tasks on the frozen LLM and the trained model: one table")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (or groups)")
    p.add_argument("--llm", required=True, help="frozen LLM: a dir, 'tiny', 'smollm2' or a .gguf file")
    p.add_argument("--adapter", required=True, help="the trained export dir (any method)")
    p.add_argument("--include-path", default=None, help="a dir of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="samples per task (lm-eval's --limit)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", help="float32 / bfloat16 / auto (the loader's default)")
    p.add_argument("--attn-backend", default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown table file (default: print only)")
    p.add_argument("--json", type=Path, default=None, help="the rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.adapter).is_dir():
        print(f"--adapter {args.adapter} is not a directory (an export dir with adapter_config.json)", file=sys.stderr)
        return 2
    table = rows(evaluate(args, None), evaluate(args, args.adapter))
    text = markdown(table)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
