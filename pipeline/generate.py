"""Batched KV-cache generation with a trained PILL: greedy or sampled (temperature, top-p).

    python -m pipeline.generate --llm LLM_DIR --vpg VPG_DIR --adapter EXPORT_DIR --image x.jpg --prompt "..."
    python -m pipeline.generate --llm ... --adapter ... --shards 'shards/demo/val-*.tar' --out preds.jsonl

How the cache works (pipeline.model.block.KVCache): per layer k after RoPE, v UNgated, and the per-token
value gate (B, S, H). Values are cached ungated because the gate is per QUERY head while v is per key/value
head (GQA); attention applies the cached gates to the cached values at every step exactly as in training.
Prompts of different lengths are LEFT-padded so every row appends at the same column; the model then masks the
pad keys and derives RoPE positions from the attention mask's cumulative sum, so a padded row computes the same
numbers as the row alone. Generated tokens are text: their modality_mask is False (gate 1, text expert).

Legend: B batch, T prompt length (padded), V vocab.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cli import run_cli
from pipeline.data.chat_template import end_of_turn_ids
from pipeline.data.config import PROMPT_FORMATS
from pipeline.data.eval import chat_prompt, default_data_config, image_tensor, shard_prompts
from pipeline.data.prompt_cut import Prompt
from pipeline.data.prompts import prompt_format_problem
from pipeline.model import PILLConfig, load_export, load_pill
from pipeline.model.attention import ATTN_BACKEND_CHOICES
from pipeline.model.batch import Batch


@dataclass
class Decoding:
    """Decoding settings, validated. temperature == 0 means greedy (argmax); top_p only applies when sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    """Seed of the sampling (sampled decoding is reproducible for a given batch composition)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationConfig(Decoding):
    """`generate`'s settings: the decoding, and how this engine's own loop runs it."""

    use_cache: bool = True
    """False = recompute the whole sequence at every step, one prompt at a time (slow reference)."""
    stop_at_eos: bool = True


def select_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or a nucleus sample at the given temperature."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Prompt], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    mm = torch.zeros((len(prompts), T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[b, T - n :] = torch.as_tensor(p.input_ids)
        attn[b, T - n :] = 1
        mm[b, T - n :] = torch.as_tensor(p.modality_mask, dtype=torch.bool)
    return ids.to(device), attn.to(device), mm.to(device)


def batch_images(prompts: Sequence[Prompt], device, dtype) -> dict:
    """{"pixel_values" or "image_features": images} (Batch fields), images in row-major order (prompt after
    prompt)."""
    kinds = {p.image_kind for p in prompts if p.images is not None and len(p.images)}
    if not kinds:
        return {}
    if len(kinds) > 1:
        raise ValueError("a batch mixes pixel_values and image_features prompts; generate them separately")
    kind = kinds.pop()
    images = torch.cat([p.images for p in prompts if p.images is not None and len(p.images)])
    return {kind: images.to(device=device, dtype=dtype if images.is_floating_point() else None)}


def check_prompts(model, prompts: Sequence[Prompt]) -> None:
    """Each prompt marks exactly K visual positions per image it carries (else the model's scatter would fail
    later with a less helpful message, or on GPU asynchronously)."""
    K = model.cfg.num_query_tokens
    for p in prompts:
        n_img = 0 if p.images is None else len(p.images)
        if sum(p.modality_mask) != n_img * K:
            raise ValueError(
                f"prompt {p.key or '?'}: {sum(p.modality_mask)} visual positions for {n_img} image(s) x K={K}"
            )


def stop_ids(model) -> set[int]:
    """Token ids that end a generation: the LLM's generation_config eos_token_id (one id or a list, from its
    generation_config.json), the tokenizer's eos, and the end-of-turn token of the tokenizer's chat template
    (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`): a chat model ends its answer with that, not with eos."""
    tok = getattr(model, "tokenizer", None)
    ids = {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model.llm, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    if tok is not None:
        ids |= set(end_of_turn_ids(tok))
    return ids


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    emb = model.llm.get_input_embeddings().weight  # every method has one (not every method has a projection)
    return emb.device, emb.dtype


@torch.no_grad()
def generate_ids(
    model,
    prompts: Sequence[Prompt],
    cfg: GenerationConfig | None = None,
    on_step: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (EOS and what follows removed). One forward for the prompt, one per new token.

    on_step (cached decoding): called with each step's (B,) next ids (pad for finished rows); it may return a (B,)
    bool mask of rows to finish now, as at EOS (pipeline.serve: stop strings, a request's own token budget, a
    client that went away), so a batch ends when its last row does."""
    cfg = cfg or GenerationConfig()
    if not prompts:
        return []
    check_prompts(model, prompts)
    if not cfg.use_cache:
        return [_generate_uncached(model, p, cfg) for p in prompts]
    device, dtype = model_device_dtype(model)
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    eos = stop_ids(model) if cfg.stop_at_eos else set()
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None

    ids, attn, mm = _left_pad(prompts, pad_id, device)
    images = batch_images(prompts, device, dtype)
    out = model(Batch(input_ids=ids, attention_mask=attn, modality_mask=mm, **images), use_cache=True)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    new_tokens = []
    for step in range(cfg.max_new_tokens):
        nxt = select_next(model.logits(out.hidden[:, -1], out.head_index), cfg, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new_tokens.append(nxt)
        done |= torch.isin(nxt, eos_t)
        if on_step is not None and (finish := on_step(nxt)) is not None:
            done |= finish.to(device)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        step_batch = Batch(
            input_ids=nxt[:, None],
            attention_mask=attn,
            modality_mask=torch.zeros((B, 1), dtype=torch.bool, device=device),
        )
        out = model(step_batch, cache=out.kv_cache, use_cache=True)
    table = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    return [_cut_at_eos(row, eos) for row in table]


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


def _generate_uncached(model, prompt: Prompt, cfg: GenerationConfig) -> list[int]:
    """Reference decoding: the full forward over prompt + generated text at every step, no cache, no padding."""
    device, dtype = model_device_dtype(model)
    eos = stop_ids(model) if cfg.stop_at_eos else set()
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    ids = torch.as_tensor([list(prompt.input_ids)], device=device)
    mm = torch.as_tensor([list(prompt.modality_mask)], dtype=torch.bool, device=device)
    images = batch_images([prompt], device, dtype)
    new = []
    for _ in range(cfg.max_new_tokens):
        out = model(Batch(input_ids=ids, modality_mask=mm, **images))
        logits = model.logits(out.hidden[:, -1], out.head_index)
        nxt = select_next(logits, cfg, generator)
        if int(nxt) in eos:
            break
        new.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mm = torch.cat([mm, torch.zeros((1, 1), dtype=torch.bool, device=device)], dim=1)
    return new


def generate(
    model, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None, batch_size: int = 8, progress: bool = False
) -> list[str]:
    """Decoded text per prompt, in input order, batch_size prompts per forward."""
    texts = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        for row in generate_ids(model, prompts[start : start + batch_size], cfg):
            texts.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return texts


# ---- loading a trained export --------------------------------------------------------------------------------------
def load_trained(
    llm: str | Path,
    adapter: str | Path | None,
    vpg: str | Path | None = None,
    attn_backend: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
):
    """The frozen LLM + front end with the trained weights of `adapter` (any method's export dir), in eval mode.

    The method and its config (stage, modules, rank) are read from the export's adapter_config.json, so gates and
    routing are exactly those of training; attn_backend may be overridden (e.g. sdpa on a machine without Triton)
    for methods that have one. No adapter: a fresh PILL (the frozen LLM's behaviour on text)."""
    if adapter is None:
        cfg = PILLConfig(attn_backend=attn_backend) if attn_backend else PILLConfig()
        return load_pill(llm, vpg, cfg=cfg, dtype=dtype, device=device).eval()
    overrides = {"attn_backend": attn_backend} if attn_backend else {}
    return load_export(adapter, llm, vpg, dtype=dtype, device=device, **overrides).eval()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--llm / --vpg / --adapter / --attn-backend / --device / --prompt-format, shared by the eval CLIs."""
    parser.add_argument("--llm", required=True, help="frozen LLM dir (transformers checkpoint + tokenizer)")
    parser.add_argument("--vpg", default=None, help="BLIP-2 VPG dir (omit for precomputed-feature shards)")
    parser.add_argument(
        "--adapter",
        default=None,
        help="export dir of any method (adapter_model.safetensors + adapter_config.json, which names the method)",
    )
    parser.add_argument("--attn-backend", default=None, choices=ATTN_BACKEND_CHOICES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # the export does not record the format: a run that set data.prompt_format explicitly must say it again here
    parser.add_argument(
        "--prompt-format",
        default="auto",
        choices=PROMPT_FORMATS,
        help="the training run's data.prompt_format (auto: from the LLM's tokenizer, as training)",
    )


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What add_model_args' values can be checked for before the (slow) model load: --prompt-format chat_template
    with an --llm whose tokenizer has no chat template."""
    problem = prompt_format_problem(args.prompt_format, args.llm)
    if problem:
        parser.error(problem.replace("data.prompt_format", "--prompt-format"))


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text with a trained PILL (KV cache, batched).")
    add_model_args(parser)
    add_generation_args(parser)
    parser.add_argument("--prompt", help="quick look: one instruction (with --image, or text only)")
    parser.add_argument("--image", default=None, help="image file for --prompt")
    parser.add_argument("--shards", help="batch mode: shard pattern/dir (stage-2 prompts, answers not shown)")
    parser.add_argument("--out", help="batch mode: predictions JSONL")
    parser.add_argument("--limit", type=int, default=None, help="batch mode: first N samples only")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if bool(args.prompt) == bool(args.shards):
        parser.error("give exactly one of --prompt (quick look) or --shards (batch mode)")
    if args.shards and not args.out:
        parser.error("--shards needs --out FILE.jsonl")
    if args.image and not Path(args.image).is_file():  # before the (slow) model load
        raise FileNotFoundError(f"--image {args.image} does not exist")
    model = load_trained(args.llm, args.adapter, args.vpg, args.attn_backend, args.device)
    cfg = generation_config(args)
    if args.prompt:
        images = image_tensor(args.image, model) if args.image else None
        prompt = chat_prompt(model, args.prompt, images, prompt_format=args.prompt_format)
        print(generate(model, [prompt], cfg)[0])
        return 0
    data_cfg = default_data_config(num_query_tokens=model.cfg.num_query_tokens, prompt_format=args.prompt_format)
    prompts = shard_prompts(args.shards, model, data_cfg, limit=args.limit)
    texts = generate(model, prompts, cfg, batch_size=args.batch_size, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for p, text in zip(prompts, texts):
            f.write(json.dumps({"key": p.key, "generation": text, "meta": p.meta}) + "\n")
    print(f"wrote {len(texts)} generations to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
