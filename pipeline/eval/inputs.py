"""Evaluation inputs built with pipeline.data's own pieces (templates, tokenisation, image transform).

- ``iter_shard_prompts`` / ``shard_prompts``: every sample of a shard set once, in order, as a generation prompt
  (pipeline.data.eval.iter_eval_samples: the training template and tokenisation, no answer).
- ``eval_batches``: the same shards as collated training batches (read once, in order, no shuffling, no
  packing), for callers that hold batches; ``prompts_from_batch`` cuts the training prompt out of them.
- ``chat_prompt`` / ``image_tensor``: a free-form instruction (``pipeline.generate --prompt``, MME questions)
  in the LLaMA-2 chat template the data pipeline uses for stage 1 and instruction data.
- ``rerender_without_image``: the same ScienceQA prompt with ``Image:N/A.`` (the 'without images' evaluation),
  rendered by the data pipeline's template rather than by deleting tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.config import DataConfig
from pipeline.eval.prompts import Prompt


@dataclass
class EvalDataConfig(DataConfig):
    """DataConfig + what evaluation decides itself: K (the model's) and the batch size of eval_batches."""

    num_query_tokens: int = 32
    batch_size: int = 16


def default_data_config(**overrides) -> EvalDataConfig:
    """The data config of evaluation: the training defaults (system message, sqa_format), no shuffling, no
    packing, a max_length large enough that no prompt is truncated (the collator would otherwise drop long
    samples), plus K and the batch size of `eval_batches`. `max_len` is accepted as the old name of max_length."""
    if "max_len" in overrides:
        overrides["max_length"] = overrides.pop("max_len")
    kw = {"shuffle_buffer": 0, "shuffle_shards": False, "pack": False, "num_workers": 0, "max_length": 8192}
    kw.update(overrides)
    return EvalDataConfig(**kw)


def eval_batches(shards, tokenizer, data_cfg=None, task: str = "auto", batch_size: int | None = None,
                 limit: int | None = None, counter=None) -> Iterator[dict]:
    """Collated batches over every sample of `shards` (pattern, list, dir or index json), in order.
    Samples the collator cannot use are skipped, logged with shard and key, and counted in `counter`
    (a pipeline.data SkipCounter; pass one to read ``counter.counts`` afterwards)."""
    from pipeline.constants import IMAGE_MEAN, IMAGE_STD
    from pipeline.data.collate import Collator
    from pipeline.data.records import SkipCounter, iter_tar, parse_json
    from pipeline.data.shardlists import expand_shards

    cfg = data_cfg or default_data_config()
    collate = Collator(cfg, tokenizer, cfg.num_query_tokens, tuple(cfg.image_mean or IMAGE_MEAN),
                       tuple(cfg.image_std or IMAGE_STD), with_meta=True)
    counter = counter if counter is not None else SkipCounter(cfg.log_skips)
    urls = expand_shards(shards)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {missing[:3]} (from {shards!r})")
    size, group = batch_size or cfg.batch_size, []
    records = (rec for url in urls for rec in parse_json(iter_tar(url, counter), counter))
    for rec in itertools.islice(records, limit):
        rec["__task__"] = task
        group.append(rec)
        if len(group) == size:
            yield collate(group, counter)
            group = []
    if group:
        yield collate(group, counter)


def iter_shard_prompts(shards, model, data_cfg=None, task: str = "auto", drop_images: bool = False,
                       limit: int | None = None, counter=None, rank: int = 0, world_size: int = 1) -> Iterator[Prompt]:
    """Generation prompts of every usable sample of `shards`, in order, streamed (images decoded one by one).
    Built by pipeline.data.eval.iter_eval_samples: the training template and tokenisation, no answer.
    drop_images=True renders each prompt with has_image=False (ScienceQA: 'Image:N/A.') and passes no image."""
    from pipeline.data.eval import iter_eval_samples

    cfg = data_cfg or default_data_config(num_query_tokens=model.cfg.num_query_tokens)
    samples = iter_eval_samples(shards, model.tokenizer, cfg, model.cfg.num_query_tokens, task=task, rank=rank,
                                world_size=world_size, counter=counter)
    for s in itertools.islice(samples, limit):
        kind = "image_features" if "image_features" in s else "pixel_values"
        images = s[kind] if s[kind].numel() else None
        meta = s["meta"]
        prompt = Prompt(s["input_ids"][0].tolist(), s["modality_mask"][0].bool().tolist(), images, image_kind=kind,
                        key=str(meta.get("key", "")), meta=meta)
        yield rerender_without_image(prompt, model, cfg) if drop_images else prompt


def shard_prompts(shards, model, data_cfg=None, drop_images: bool = False, limit: int | None = None,
                  batch_size: int = 16, task: str = "auto", counter=None) -> list[Prompt]:
    """iter_shard_prompts as a list (to evaluate the same prompts twice, e.g. with and without images).
    batch_size is accepted for backward compatibility and unused (prompts are built one by one)."""
    return list(iter_shard_prompts(shards, model, data_cfg, task, drop_images, limit, counter))


def rerender_without_image(prompt: Prompt, model, data_cfg=None) -> Prompt:
    """The same sample's prompt rendered with has_image=False (ScienceQA: 'Image:N/A.'), no visual tokens."""
    from pipeline.data.prompts import render
    from pipeline.data.tokenize import encode_prompt

    cfg = data_cfg or default_data_config(num_query_tokens=model.cfg.num_query_tokens)
    conv = render(prompt.meta, prompt.meta.get("caption"), prompt.meta.get("task", "auto"), False, cfg)
    enc = encode_prompt(conv, model.tokenizer, model.cfg.num_query_tokens)
    return Prompt(enc.input_ids.tolist(), enc.modality_mask.tolist(), None, key=prompt.key, meta=prompt.meta,
                  answer_ids=prompt.answer_ids)


def image_tensor(path: str | Path, model) -> torch.Tensor:
    """(1, 3, S, S) pixel_values with the training transform (BLIP-2 eval transform, the VPG's image size)."""
    from pipeline.data.transforms import decode_image, default_mean_std, normalise

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    size = model.vpg.image_size if model.vpg is not None else 224
    mean, std = default_mean_std()
    return normalise([decode_image(path.read_bytes(), size)], mean, std, size)


def chat_prompt(model, text: str, images: torch.Tensor | None = None, system: str | None = None) -> Prompt:
    """``[INST] <image>\\n{text} [/INST]`` (the image marker first, as LLaVA's data has it), no answer. Several
    images: one ``<image>`` per image in ``text`` (or none: then they all go in front), in image order."""
    from pipeline.data.prompts import IMAGE, Conversation, with_image_markers
    from pipeline.data.tokenize import encode_prompt

    n = 0 if images is None else len(images)
    if n and model.vpg is None and images.dim() == 4:
        raise ValueError("an image was given but the model has no VPG: pass --vpg")
    if n > 1 and IMAGE not in text:
        text = IMAGE * n + "\n" + text
    conv = Conversation(system, with_image_markers([(text, "")], n))
    enc = encode_prompt(conv, model.tokenizer, model.cfg.num_query_tokens)
    kind = "image_features" if n and images.dim() == 3 else "pixel_values"
    return Prompt(enc.input_ids.tolist(), enc.modality_mask.tolist(), images if n else None, image_kind=kind)
