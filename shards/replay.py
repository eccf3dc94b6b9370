"""Self-distilled text replay: the frozen LLM answers text-only prompts, and the answers become text-only
conversation shards a stage can mix in to keep the LLM's own text behaviour (issue 27, item 2).

    python -m shards.replay --llm smollm2 --out shards/replay                  # the shipped 540 prompts
    python -m shards.replay --llm LLM_DIR|FILE.gguf --prompts my.jsonl --out DIR [--max-new-tokens 256]
        [--temperature 0] [--batch-size 16] [--prompt-format auto]

Each prompt (a JSONL line `{"prompt": "...", "id": "..."?}`; default: shards/data/replay_prompts.jsonl) is rendered
as one user turn in the run's prompt format (`auto`: the tokenizer's own chat template when it has one, exactly as
training renders a chat record, pipeline.data.tokenize) and answered by the frozen LLM alone (no method around it)
with transformers' generate: KV cache, left-padded batches, greedy unless --temperature > 0. Each sample is
`{key}.json` = `{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
"has_image": false, "source": "replay", ...}`, no image member, written by the shared shard writer with its
`{name}-index.json` (the generation settings are in the index).

Skipped and counted in the index (never written): an answer that hit --max-new-tokens before the LLM's stop token
(`truncated`: training labels the end-of-turn token after the answer, so a cut answer would teach the model to stop
early; --keep-truncated writes them anyway) and an empty answer (`empty_answer`: the trainer skips it too).

Shards are always rewritten (the writer's resume keys shards by sample keys only, which do not change with the LLM
or the settings: keeping them could mix two LLMs' answers). A prompt file that is not JSONL, or a line without a
non-empty "prompt" string, exits with status 2 naming the file and line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from pipeline.data.config import PROMPT_FORMATS
from pipeline.data.prompts import Conversation, prompt_format_problem
from pipeline.data.tokenize import encode_prompt
from pipeline.eval.retention import PromptFileError, Sampling, llm_answers, read_prompt_file
from pipeline.generate import stop_ids
from pipeline.model import load_llm
from pipeline.model.frozen import default_dtype, is_materialised_source
from shards.common import json_bytes
from shards.writer import Sample, SkipSample, WriterConfig, add_writer_args, sanitize_key, summary, write_shards

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FrozenLM:
    """The frozen LLM and its tokenizer, shaped as pipeline.generate.stop_ids reads a model."""

    llm: Any
    tokenizer: Any


def shipped_prompts() -> Path:
    return Path(str(resources.files("shards").joinpath("data/replay_prompts.jsonl")))


def make_sample(item: dict[str, Any], keep_truncated: bool) -> Sample:
    """One generated answer -> a text-only chat sample (SkipSample for a cut or empty answer)."""
    key = item["key"]
    if not item["answer"].strip():
        raise SkipSample("empty_answer", f"{key}: {item['prompt'][:60]!r}")
    if not item["stopped"] and not keep_truncated:
        raise SkipSample("truncated", f"{key}: no stop token within {item['answer_tokens']} tokens")
    meta = {
        "id": item["id"],
        "key": key,
        "conversations": [{"from": "human", "value": item["prompt"]}, {"from": "gpt", "value": item["answer"]}],
        "has_image": False,
        "source": "replay",
        "replay": {"answer_tokens": item["answer_tokens"], "stopped": item["stopped"]},
    }
    return Sample(key, {"json": json_bytes(meta)})


def answer_prompts(args: argparse.Namespace, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Load the frozen LLM, render and answer every prompt; one item per prompt, in file order."""
    llm, tok = load_llm(args.llm, DTYPES[args.dtype] or default_dtype(), args.device)
    llm.eval()
    ids = [
        encode_prompt(Conversation(None, [(r["prompt"], "")]), tok, 1, args.prompt_format).input_ids.tolist()
        for r in rows
    ]
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    out = llm_answers(
        llm,
        ids,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        eos=stop_ids(FrozenLM(llm, tok)),
        sampling=sampling,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    return [
        {
            "key": sanitize_key(f"{i:06d}_{r['id']}"),
            "id": r["id"],
            "prompt": r["prompt"],
            "answer": tok.decode(a, skip_special_tokens=True),
            "answer_tokens": len(a),
            "stopped": s is not None,
        }
        for i, (r, a, s) in enumerate(zip(rows, out.answers, out.stops))
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shards.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", required=True, help="frozen LLM: a transformers checkpoint dir, a .gguf file, smollm2")
    p.add_argument("--prompts", type=Path, default=None, help='JSONL of {"prompt": ...} (default: the shipped set)')
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, with --temperature > 0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS, help="the training run's")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-truncated", action="store_true", help="also write answers cut at --max-new-tokens")
    add_writer_args(p, default_max_samples=5000)
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    try:
        Sampling(a.max_new_tokens, a.temperature, a.top_p, a.seed)
    except ValueError as e:
        p.error(str(e).replace("max_new_tokens", "--max-new-tokens").replace("top_p", "--top-p"))
    if not is_materialised_source(a.llm) and (problem := prompt_format_problem(a.prompt_format, a.llm)):
        p.error(problem.replace("data.prompt_format", "--prompt-format"))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    prompts_path = a.prompts or shipped_prompts()
    try:
        rows = read_prompt_file(prompts_path)
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items = answer_prompts(a, rows)
    settings = {
        "llm": str(a.llm),
        "prompts": str(prompts_path),
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "seed": a.seed,
        "prompt_format": a.prompt_format,
        "dtype": a.dtype,
        "keep_truncated": a.keep_truncated,
    }
    cfg = WriterConfig(
        out_dir=a.out,
        name=a.name or "replay",
        max_samples=a.max_samples,
        max_size=int(a.max_size),
        workers=a.workers,
        resume=False,  # see the module docstring
        progress=not a.no_progress,
        meta={"builder": "replay", "content": "text", "replay": settings},
    )
    fn = partial(make_sample, keep_truncated=a.keep_truncated)
    index = write_shards(items, [i["key"] for i in items], [len(i["answer"]) + 512 for i in items], fn, cfg)
    print(summary(index))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
