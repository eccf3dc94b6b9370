"""Multiple-choice evaluation (ScienceQA and the demo's held-out split): one code path for both.

Two modes:
- ``generate`` (default, the paper's protocol): greedy generation after the training prompt, then the first
  ``The answer is ([A-Z])`` match; unparsed outputs are wrong (and, separately, a seeded random option).
- ``logits`` (a cheaper alternative for CPU runs and training-time checks, NOT the paper's protocol): teacher-force
  the answer's own prefix "The answer is" and take the option letter with the highest next-token logit. Never
  unparsed; one forward per batch instead of one per generated token.
Without images (``drop_images=True``) every prompt is re-rendered by the data pipeline with ``Image:N/A.``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from pipeline.data.eval import rerender_without_image
from pipeline.data.prompt_cut import Prompt, iter_prompts
from pipeline.eval.parsing import OPTION_LETTERS, parse_choice
from pipeline.eval.sqa_scoring import MCRecord, categories_of, score_multiple_choice
from pipeline.generate import GenerationConfig, batch_images, generate, model_device_dtype
from pipeline.model.batch import Batch

ANSWER_PREFIX = "The answer is "
MODES = ("generate", "logits")


def sample_categories(meta: dict) -> tuple[str, ...]:
    """ScienceQA categories when the sample has their fields (ScienceQA and the demo do), plus the demo's qtype.
    Real ScienceQA samples (source "scienceqa") are checked strictly: an unknown subject is an error."""
    cats: tuple[str, ...] = ()
    if all(k in meta for k in ("subject", "grade", "hint")):
        cats = categories_of(meta, strict=meta.get("source") == "scienceqa")
    if meta.get("qtype"):
        cats += (f"qtype:{meta['qtype']}",)
    return cats


def _check_meta(p: Prompt) -> tuple[list, int]:
    for field in ("choices", "answer"):
        if field not in p.meta:
            raise KeyError(
                f"sample {p.key}: field '{field}' missing; multiple-choice evaluation needs "
                "ScienceQA-style json (question, choices, answer index)"
            )
    return p.meta["choices"], int(p.meta["answer"])


def letter_token_ids(tokenizer, num_choices: int) -> tuple[list[int], list[int]]:
    """(prefix ids of "The answer is", [id of each option letter right after it]), tokenised the way the data
    pipeline tokenises an answer (its own tokenizer call, no special tokens). Raises when a letter is not one
    token after a shared prefix (then use mode='generate')."""
    seqs = [
        tokenizer(f"{ANSWER_PREFIX}{OPTION_LETTERS[i]}.", add_special_tokens=False)["input_ids"]
        for i in range(num_choices)
    ]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    letters = [s[n] if len(s) > n else None for s in seqs]
    if None in letters or len(set(letters)) != num_choices or any(s[:n] != seqs[0][:n] for s in seqs):
        raise ValueError(
            f"option letters do not tokenise to distinct single tokens after {ANSWER_PREFIX!r}; "
            "logit scoring is not possible with this tokenizer, use mode='generate'"
        )
    return seqs[0][:n], letters


@torch.no_grad()
def predict_by_logits(model, prompts: Sequence[Prompt], batch_size: int = 8) -> list[int]:
    """Option index with the highest next-token logit after prompt + "The answer is" (right-padded, no cache)."""
    device, dtype = model_device_dtype(model)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    preds = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows, cands = [], []
        for p in chunk:
            prefix, letters = letter_token_ids(tok, len(_check_meta(p)[0]))
            rows.append((list(p.input_ids) + prefix, list(p.modality_mask) + [False] * len(prefix)))
            cands.append(letters)
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mm = torch.zeros((len(rows), T), dtype=torch.bool)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        for b, (r_ids, r_mm) in enumerate(rows):
            ids[b, : len(r_ids)], mm[b, : len(r_ids)], attn[b, : len(r_ids)] = (
                torch.tensor(r_ids),
                torch.tensor(r_mm),
                1,
            )
        batch = Batch(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            modality_mask=mm.to(device),
            **batch_images(chunk, device, dtype),
        )
        out = model(batch)
        last = attn.sum(1).to(device) - 1
        logits = model.logits(out.hidden[torch.arange(len(rows), device=device), last], out.head_index)  # (B, V)
        for b, letters in enumerate(cands):
            preds.append(int(logits[b, letters].argmax()))
    return preds


def evaluate_multiple_choice(
    model,
    batches: Iterable[dict] | Sequence[Prompt],
    *,
    mode: str = "generate",
    drop_images: bool = False,
    data_cfg=None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int | None = None,
    seed: int = 0,
    predictions_path: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Score a model on multiple-choice samples.

    model: the PILL module (with DeepSpeed, ``engine.module``). batches: collated stage-2 batches from
    pipeline.data (e.g. ``pipeline.data.eval.eval_batches``) or ready ``Prompt``s. data_cfg: the DataConfig
    the batches were built with (used only to re-render prompts for drop_images; default: training defaults).
    Returns score_multiple_choice's dict (accuracy, n, correct, chance, unparsed, accuracy_random_fallback,
    categories) plus mode and images; with predictions_path, one JSON line per sample.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    model.eval()
    records, texts = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"eval ({mode}, {'no ' if drop_images else ''}images)", unit="sample")
    try:
        # Stream in chunks: a whole test set's pixel_values would not fit in host memory at once.
        for chunk in _chunks(_prompts(model, batches, limit, drop_images, data_cfg), batch_size * 8):
            preds, out = _predict(model, chunk, mode, max_new_tokens, batch_size)
            texts += out
            records += [_record(p, pred) for p, pred in zip(chunk, preds)]
            if bar is not None:
                bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not records:
        raise ValueError("no multiple-choice samples to evaluate (empty shards, or every sample skipped)")
    scores = score_multiple_choice(records, seed=seed)
    scores.update(mode=mode, images="without" if drop_images else "with")
    if predictions_path is not None:
        write_predictions(predictions_path, records, texts)
    return scores


def _predict(model, chunk: list[Prompt], mode: str, max_new_tokens: int, batch_size: int):
    """(predicted option index or None per prompt, the text it was read from)."""
    if mode == "generate":
        out = generate(model, chunk, GenerationConfig(max_new_tokens=max_new_tokens), batch_size)
        return [parse_choice(t, len(_check_meta(p)[0])) for p, t in zip(chunk, out)], out
    preds = predict_by_logits(model, chunk, batch_size)
    return preds, [f"{ANSWER_PREFIX}{OPTION_LETTERS[i]}." for i in preds]


def _record(p: Prompt, pred: int | None) -> MCRecord:
    choices, answer = _check_meta(p)
    return MCRecord(key=p.key, answer=answer, num_choices=len(choices), pred=pred, categories=sample_categories(p.meta))


def _prompts(model, batches, limit, drop_images, data_cfg) -> Iterator[Prompt]:
    items = iter(batches)
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if isinstance(first, Prompt):
        prompts = itertools.islice(items, limit)
    else:
        prompts = iter_prompts(items, model.cfg.num_query_tokens, limit=limit)
    if drop_images:
        prompts = (rerender_without_image(p, model, data_cfg) for p in prompts)
    yield from prompts


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def write_predictions(path: str | Path, records: Sequence[MCRecord], texts: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec, text in zip(records, texts):
            f.write(
                json.dumps(
                    {
                        "key": rec.key,
                        "answer": rec.answer,
                        "pred": rec.pred,
                        "correct": rec.pred == rec.answer,
                        "generation": text,
                        "categories": list(rec.categories),
                    }
                )
                + "\n"
            )
