"""Text retention: does the trained model, given no image, still answer as the frozen LLM does?

PILL's premise is that the LLM's own ability survives (zero-init gate and experts: at init it IS the frozen LLM).
On a fixed set of text-only prompts shipped with the repo (text_prompts.jsonl: general questions and
instructions), each rendered as a user turn in the run's prompt format:

- identical: the share of prompts whose greedy answer (first `max_new_tokens` = 32 tokens, cut at the stop
  token) is token for token the frozen LLM's;
- mean KL: the per-token KL(frozen || trained) of the next-token distributions along the frozen LLM's own answer
  (teacher-forced, so one early divergence does not decide every later token), averaged over all answer tokens.

The frozen reference is the model's own `llm` (its weights never change) run through transformers' generate and
forward, not through the method's code: a method bug at init shows up here as a KL above 0.

Legend: B prompts in a batch, T tokens (prompt + answer, right-padded), V vocab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.eval import chat_prompt
from pipeline.data.prompt_cut import Prompt
from pipeline.generate import GenerationConfig, generate_ids, model_device_dtype, stop_ids
from pipeline.model.batch import Batch

PROMPTS_FILE = "text_prompts.jsonl"


@dataclass
class FrozenAnswers:
    """The frozen LLM's greedy answers (token ids, stop token excluded) and the stop token each ended on (None: it
    ran to max_new_tokens)."""

    answers: list[list[int]]
    stops: list[int | None]


def load_text_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The shipped prompts (pipeline/eval/text_prompts.jsonl), or a JSONL file of {"prompt": ...} lines."""
    text = Path(path).read_text() if path else resources.files("pipeline.eval").joinpath(PROMPTS_FILE).read_text()
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
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
class Sampling:
    """How `llm_answers` decodes: temperature 0 = greedy (transformers' generate with do_sample=False)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    """Seeds torch once before the first batch: a sampled run is reproducible for the same prompts and batch size."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

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


def frozen_answers(model, prompts: list[Prompt], max_new_tokens: int, batch_size: int) -> FrozenAnswers:
    """Greedy answers of the frozen LLM (`model.llm`, no method code) to text-only prompts."""
    tok = model.tokenizer
    return llm_answers(
        model.llm,
        [list(p.input_ids) for p in prompts],
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        eos=stop_ids(model),
        sampling=Sampling(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
    )


@torch.no_grad()
def answer_kl(model, prompts: list[Prompt], ref: FrozenAnswers, batch_size: int) -> list[list[float]]:
    """Per prompt, KL(frozen || trained) at each position that predicts a token of the frozen answer (and its
    stop token when it stopped)."""
    device, _ = model_device_dtype(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for p, a, s in zip(
            prompts[start : start + batch_size],
            ref.answers[start : start + batch_size],
            ref.stops[start : start + batch_size],
        ):
            rows.append((list(p.input_ids), a + ([] if s is None else [s])))
        T = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for b, (p, a) in enumerate(rows):
            ids[b, : len(p) + len(a)] = torch.as_tensor(p + a)
            attn[b, : len(p) + len(a)] = 1
        logp_f = F.log_softmax(model.llm(input_ids=ids, attention_mask=attn).logits.float(), -1)  # (B, T, V)
        logp_t = F.log_softmax(model.output_logits(model(Batch(input_ids=ids, attention_mask=attn))).float(), -1)
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
) -> dict:
    """{"identical": percent of prompts answered identically, "mean_kl": nats per token, ...}; pass `frozen` (the
    "frozen" entry of an earlier result on the same prompts) to skip regenerating the reference."""
    texts = texts if texts is not None else load_text_prompts()
    model.eval()
    prompts = [chat_prompt(model, t, prompt_format=prompt_format) for t in texts]
    ref = frozen or frozen_answers(model, prompts, max_new_tokens, batch_size)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    ours = [
        a for s in range(0, len(prompts), batch_size) for a in generate_ids(model, prompts[s : s + batch_size], gen)
    ]
    kls = answer_kl(model, prompts, ref, batch_size)
    same = [o[:max_new_tokens] == r[:max_new_tokens] for o, r in zip(ours, ref.answers)]
    n_tok = sum(len(k) for k in kls)
    tok = model.tokenizer
    return {
        "identical": 100.0 * sum(same) / len(same),
        "mean_kl": sum(sum(k) for k in kls) / max(n_tok, 1),
        "n_prompts": len(texts),
        "n_tokens": n_tok,
        "max_new_tokens": max_new_tokens,
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
    lines = [
        "### Text retention (no image, against the frozen LLM)",
        "",
        "| export | prompts | identical greedy answers (first 32 tokens) | mean per-token KL (nats) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n_prompts']} | {r['identical']:.1f}% | {r['mean_kl']:.4g} |")
    return "\n".join(lines) + "\n"
