"""Text retention: does the trained model, given no image, still answer as the frozen LLM does?

    python -m pipeline.eval.retention --llm LLM --adapter EXPORT [--vpg VPG] [--prompts FILE.jsonl] --out-dir D
        [--max-new-tokens 32] [--limit N] [--reference auto|adapters_off|llm]

PILL's premise is that the LLM's own ability survives (zero-init gate and experts: at init it IS the frozen LLM).
On text-only prompts (default: text_prompts.jsonl shipped with the repo, general questions and instructions; any
JSONL of {"prompt": ...} lines), each rendered as a user turn in the run's prompt format:

- identical: the share of prompts whose greedy answer (first `max_new_tokens` = 32 tokens, cut at the stop
  token) is token for token the frozen LLM's;
- mean KL: the per-token KL(frozen || trained) of the next-token distributions along the frozen LLM's own answer
  (teacher-forced, so one early divergence does not decide every later token), averaged over all answer tokens.

The frozen reference (`reference`): "adapters_off" runs the same model under the method contract's adapters_off()
(the frozen LLM through the method's own code, backends and cache: the teacher training's KL and retention during
training see), "llm" runs the model's `llm` through transformers' generate and forward (no method code at all: a
method bug at init shows up as a KL above 0); "auto" = adapters_off where the method supports it. The two agree to
fp32 rounding (tests/test_zero_init.py). The CLI writes `retention.json` (identical, mean_kl, the per-prompt
examples) and `retention.md` into --out-dir, for any method's export.

Legend: B prompts in a batch, T tokens (prompt + answer, right-padded), V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.eval import chat_prompt
from pipeline.data.prompt_cut import Prompt
from pipeline.data.prompts import IMAGE
from pipeline.generate import (
    Decoding,
    GenerationConfig,
    add_model_args,
    check_model_args,
    generate_ids,
    load_trained,
    model_device_dtype,
    stop_ids,
)
from pipeline.model.batch import Batch

PROMPTS_FILE = "text_prompts.jsonl"
REFERENCES = ("auto", "adapters_off", "llm")


@dataclass
class FrozenAnswers:
    """The frozen LLM's greedy answers (token ids, stop token excluded) and the stop token each ended on (None: it
    ran to max_new_tokens)."""

    answers: list[list[int]]
    stops: list[int | None]


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


def read_prompt_file(path: str | Path) -> list[dict[str, str]]:
    """[{"id", "prompt"}] from a JSONL file of {"prompt": ..., "id": ...?} lines (blank lines skipped); anything
    else raises PromptFileError naming `path:line`. Prompts are text-only: an `<image>` marker is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot read the prompt file: {e}") from None
    rows: list[dict[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f'{path}:{n}: not a JSON line ({e.msg}); expected {{"prompt": "..."}}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise PromptFileError(f'{path}:{n}: needs a non-empty string field "prompt" (got {got})')
        if IMAGE in rec["prompt"]:
            raise PromptFileError(f"{path}:{n}: the prompts are text-only; {IMAGE} is not allowed")
        rows.append({"id": str(rec.get("id", f"line{n}")), "prompt": rec["prompt"]})
    if not rows:
        raise PromptFileError(f'{path}: no prompts (one JSON object with a "prompt" field per line)')
    return rows


def shipped_prompts_path() -> Path:
    return Path(str(resources.files("pipeline.eval").joinpath(PROMPTS_FILE)))


def load_text_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The shipped prompts (pipeline/eval/text_prompts.jsonl), or a JSONL file of {"prompt": ...} lines."""
    prompts = [r["prompt"] for r in read_prompt_file(path or shipped_prompts_path())]
    return prompts[:limit] if limit else prompts


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.as_tensor(r)
        attn[b, T - len(r) :] = 1
    return ids.to(device), attn.to(device)


@dataclass
class Sampling(Decoding):
    """How `llm_answers` decodes, through transformers' generate: temperature 0 = greedy (do_sample=False); the
    seed seeds torch once before the first batch, so a sampled run is reproducible for the same prompts and batch
    size."""

    max_new_tokens: int = 32

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@torch.no_grad()
def llm_answers(
    llm,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos: set[int],
    sampling: Sampling,
    batch_size: int,
    progress: bool = False,
) -> FrozenAnswers:
    """Answers of a plain transformers causal LM (the frozen LLM, no method around it) to tokenised prompts, in
    input order: transformers' generate with its KV cache on left-padded batches. Prompts are batched by length
    (less padding); with greedy decoding the batch a prompt lands in does not change its answer."""
    device = llm.get_input_embeddings().weight.device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    answers: list[list[int]] = [[] for _ in prompt_ids]
    stops: list[int | None] = [None] * len(prompt_ids)
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
    bar = tqdm(total=len(order), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, attn = _left_padded([prompt_ids[i] for i in rows], pad_id, device)
        out = llm.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(eos),
            pad_token_id=pad_id,
            **sampling.generate_kwargs(),
        )[:, ids.shape[1] :]
        for i, row in zip(rows, out.tolist()):
            cut = next((j for j, t in enumerate(row) if t in eos), None)
            answers[i] = row if cut is None else row[:cut]
            stops[i] = None if cut is None else row[cut]
        bar.update(len(rows))
    bar.close()
    return FrozenAnswers(answers, stops)


def resolve_reference(model, reference: str = "auto") -> str:
    """ "adapters_off" or "llm" (module docstring); auto = adapters_off where the method supports it."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    supported = bool(getattr(model, "supports_adapters_off", False))
    if reference == "adapters_off" and not supported:
        raise ValueError(f"{type(model).__name__} has no adapters_off(); use reference='llm'")
    return reference if reference != "auto" else ("adapters_off" if supported else "llm")


def _frozen(model, reference: str):
    return model.adapters_off() if reference == "adapters_off" else contextlib.nullcontext()


def frozen_answers(
    model, prompts: list[Prompt], max_new_tokens: int, batch_size: int, reference: str = "llm"
) -> FrozenAnswers:
    """Greedy answers of the frozen LLM to text-only prompts: `model.llm` through transformers' generate, or the
    method's own generation under adapters_off() (run to max_new_tokens, then cut at the first stop token so the
    stop token is known)."""
    tok = model.tokenizer
    eos = stop_ids(model)
    if reference == "llm":
        return llm_answers(
            model.llm,
            [list(p.input_ids) for p in prompts],
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            eos=eos,
            sampling=Sampling(max_new_tokens=max_new_tokens),
            batch_size=batch_size,
        )
    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
    answers, stops = [], []
    with model.adapters_off():
        for s in range(0, len(prompts), batch_size):
            for row in generate_ids(model, prompts[s : s + batch_size], gen):
                cut = next((i for i, t in enumerate(row) if t in eos), None)
                answers.append(row if cut is None else row[:cut])
                stops.append(None if cut is None else row[cut])
    return FrozenAnswers(answers, stops)


def _answer_rows(prompts: list[Prompt], ref: FrozenAnswers, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Prompt + frozen answer (+ its stop token), right-padded: (B, T) ids and mask, and the [(prompt, answer)]."""
    rows = [(list(p.input_ids), a + ([] if s is None else [s])) for p, a, s in zip(prompts, ref.answers, ref.stops)]
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for b, (p, a) in enumerate(rows):
        ids[b, : len(p) + len(a)] = torch.as_tensor(p + a)
        attn[b, : len(p) + len(a)] = 1
    return ids, attn, rows


@torch.no_grad()
def answer_kl(
    model, prompts: list[Prompt], ref: FrozenAnswers, batch_size: int, reference: str = "llm"
) -> list[list[float]]:
    """Per prompt, KL(frozen || trained) at each position that predicts a token of the frozen answer (and its
    stop token when it stopped); the teacher is `model.llm` or the model under adapters_off()."""
    device, _ = model_device_dtype(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        ids, attn, rows = _answer_rows(prompts[sl], FrozenAnswers(ref.answers[sl], ref.stops[sl]), device)
        batch = Batch(input_ids=ids, attention_mask=attn)
        if reference == "llm":
            teacher = model.llm(input_ids=ids, attention_mask=attn).logits
        else:
            with model.adapters_off():
                teacher = model.output_logits(model(batch))
        logp_f = F.log_softmax(teacher.float(), -1)  # (B, T, V)
        logp_t = F.log_softmax(model.output_logits(model(batch)).float(), -1)
        kl = (logp_f.exp() * (logp_f - logp_t)).sum(-1)  # (B, T)
        for b, (p, a) in enumerate(rows):
            out.append(kl[b, len(p) - 1 : len(p) - 1 + len(a)].clamp(min=0).tolist())
    return out


def text_retention(
    model,
    texts: list[str] | None = None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    prompt_format: str = "auto",
    frozen: FrozenAnswers | None = None,
    reference: str = "auto",
) -> dict:
    """{"identical": percent of prompts answered identically, "mean_kl": nats per token, ...}; pass `frozen` (the
    "frozen" entry of an earlier result on the same prompts and reference) to skip regenerating the reference."""
    texts = texts if texts is not None else load_text_prompts()
    reference = resolve_reference(model, reference)
    model.eval()
    prompts = [chat_prompt(model, t, prompt_format=prompt_format) for t in texts]
    ref = frozen or frozen_answers(model, prompts, max_new_tokens, batch_size, reference)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    ours = [
        a for s in range(0, len(prompts), batch_size) for a in generate_ids(model, prompts[s : s + batch_size], gen)
    ]
    kls = answer_kl(model, prompts, ref, batch_size, reference)
    same = [o[:max_new_tokens] == r[:max_new_tokens] for o, r in zip(ours, ref.answers)]
    n_tok = sum(len(k) for k in kls)
    tok = model.tokenizer
    return {
        "identical": 100.0 * sum(same) / len(same),
        "mean_kl": sum(sum(k) for k in kls) / max(n_tok, 1),
        "n_prompts": len(texts),
        "n_tokens": n_tok,
        "max_new_tokens": max_new_tokens,
        "reference": reference,
        "units": {"identical": "percent", "mean_kl": "nats per token"},
        "frozen": ref,
        "examples": [
            {
                "prompt": t,
                "frozen": tok.decode(r),
                "trained": tok.decode(o),
                "identical": s,
                "mean_kl": sum(k) / max(len(k), 1),
            }
            for t, r, o, s, k in zip(texts, ref.answers, ours, same, kls)
        ],
    }


def markdown(results: dict[str, dict]) -> str:
    """One table row per evaluated export (e.g. stage1, stage2)."""
    n = next(iter(results.values()))["max_new_tokens"] if results else 32
    lines = [
        "### Text retention (no image, against the frozen LLM)",
        "",
        f"| export | prompts | identical greedy answers (first {n} tokens) | mean per-token KL (nats) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n_prompts']} | {r['identical']:.1f}% | {r['mean_kl']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.retention", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompts", type=Path, default=None, help='JSONL of {"prompt": ...} (default: the shipped 56)')
    p.add_argument("--out-dir", type=Path, required=True, help="writes retention.json and retention.md there")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    p.add_argument("--reference", default="auto", choices=REFERENCES, help="the frozen reference (module docstring)")
    a = p.parse_args(argv)
    check_model_args(p, a)
    if a.max_new_tokens < 1 or a.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")
    try:
        texts = load_text_prompts(a.prompts, a.limit)
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_trained(a.llm, a.adapter, a.vpg, a.attn_backend, a.device)
    r = text_retention(
        model,
        texts,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        prompt_format=a.prompt_format,
        reference=a.reference,
    )
    r.pop("frozen")
    r.update(adapter=str(a.adapter), llm=str(a.llm), prompts=str(a.prompts or shipped_prompts_path()))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "retention.json").write_text(json.dumps(r, indent=1, ensure_ascii=False))
    (a.out_dir / "retention.md").write_text(markdown({Path(a.adapter).name if a.adapter else "init": r}))
    print(
        f"{r['identical']:.1f}% identical greedy answers, mean KL {r['mean_kl']:.4g} nats/token over "
        f"{r['n_tokens']} tokens of {r['n_prompts']} prompts (reference: {r['reference']}) -> {a.out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
