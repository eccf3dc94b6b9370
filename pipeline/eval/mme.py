"""MME evaluation: ``python -m pipeline.eval.mme --llm DIR --vpg DIR --adapter EXPORT --mme-root DIR --out-dir DIR``.

Reads MME's released layout (pipeline.eval.mme_data), asks each question in the LLaMA-2 chat template
(``[INST] <image>\\n{question} [/INST]``, the instruction-tuning prompt), greedy decoding, and scores as MME's
``eval_tool/calculation.py`` (pipeline.eval.mme_scoring). Writes into --out-dir:
- ``results/<subtask>.txt``: ``image_name<TAB>question<TAB>gt<TAB>prediction``, eval_tool's input format, so the
  official ``python calculation.py --results_dir results`` can re-score them;
- ``scores.json`` and ``table.md`` (per-subtask acc, acc+, score; perception and cognition totals).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from pipeline.cli import run_cli
from pipeline.data.eval import chat_prompt, image_tensor
from pipeline.eval.mme_data import MMEQuestion, load_mme
from pipeline.eval.mme_scoring import markdown_table, score_mme
from pipeline.generate import GenerationConfig, add_model_args, check_model_args, generate, load_trained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a trained PILL on MME (perception and cognition scores).")
    add_model_args(p)
    p.add_argument("--mme-root", required=True, help="MME_Benchmark_release_version/ (one folder per subtask)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--subtasks", default=None, help="comma list (default: every subtask folder present)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="the parser reads the first 4 characters")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N questions only (smoke tests)")
    return p


def answer_questions(
    model,
    questions: list[MMEQuestion],
    cfg: GenerationConfig,
    batch_size: int,
    progress: bool = False,
    prompt_format: str = "auto",
) -> list[str]:
    """Generated text per question, prompts in prompt_format; images are decoded chunk by chunk (the whole set does
    not fit in memory)."""
    texts: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), desc="MME", unit="question")
    it = iter(questions)
    while chunk := list(itertools.islice(it, batch_size * 8)):
        prompts = [
            chat_prompt(model, q.question, image_tensor(q.image_path, model), prompt_format=prompt_format)
            for q in chunk
        ]
        texts += generate(model, prompts, cfg, batch_size)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return texts


def eval_tool_text(text: str) -> str:
    """The prediction as results/*.txt holds it: one line, no tabs, no leading/trailing whitespace (newlines and
    tabs would break eval_tool's TSV). Both scorings parse this text, so they agree."""
    return " ".join(text.replace("\t", " ").split())


def write_results(out: Path, questions: list[MMEQuestion], texts: list[str]) -> None:
    """eval_tool's per-subtask files (`image<TAB>question<TAB>gt<TAB>prediction`)."""
    res = out / "results"
    res.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for q, text in zip(questions, texts):
        pred = eval_tool_text(text)
        lines.setdefault(q.subtask, []).append(f"{q.image_name}\t{q.question}\t{q.answer.capitalize()}\t{pred}")
    for task, rows in lines.items():
        (res / f"{task}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_and_score(out: Path, questions: list[MMEQuestion], texts: list[str]) -> dict:
    """results/*.txt, then the scores of exactly the predictions written there."""
    preds = [eval_tool_text(t) for t in texts]
    write_results(Path(out), questions, preds)
    return score_mme(zip(questions, preds))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    subtasks = [t.strip() for t in args.subtasks.split(",")] if args.subtasks else None
    questions = load_mme(args.mme_root, subtasks)[: args.limit]
    model = load_trained(args.llm, args.adapter, args.vpg, args.attn_backend, args.device)
    if model.vpg is None:
        raise ValueError("MME needs the VPG (--vpg): its images are pixels, not precomputed features")
    texts = answer_questions(
        model,
        questions,
        GenerationConfig(max_new_tokens=args.max_new_tokens),
        args.batch_size,
        progress=True,
        prompt_format=args.prompt_format,
    )
    out = Path(args.out_dir)
    scores = write_and_score(out, questions, texts)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    table = markdown_table(scores)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out}/results/*.txt, scores.json, table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
