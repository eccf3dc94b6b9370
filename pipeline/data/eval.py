"""Evaluation and generation inputs, built by the training template + tokenisation code (so generation starts exactly
where the training answer started):

- ``iter_eval_samples``: every sample of a shard set once, in order, as a generation prompt (no answer); bad samples
  are skipped and counted in ``counter`` like in training. ``iter_shard_prompts`` / ``shard_prompts`` wrap them as
  ``Prompt``s.
- ``eval_batches``: the same shards as collated training batches (read once, in order, no shuffling, no packing);
  ``prompt_cut.prompts_from_batch`` cuts the training prompt out of them.
- ``chat_prompt`` / ``image_tensor``: a free-form instruction (``pipeline.generate --prompt``, MME questions, a
  text-only prompt) in the resolved prompt format (``data.prompt_format``: the paper's LLaMA-2 turns or the
  tokenizer's chat template).
- ``rerender_without_image``: the same ScienceQA prompt with ``Image:N/A.`` (the 'without images' evaluation),
  rendered by the template rather than by deleting tokens.

Every function that renders takes ``prompt_format`` (default: the data config's, ``auto`` = from the tokenizer).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.constants import IMAGE_MEAN, IMAGE_STD
from pipeline.data.collate import Collator, _txt
from pipeline.data.config import DataConfig
from pipeline.data.prompt_cut import Prompt
from pipeline.data.prompts import (
    IMAGE,
    Conversation,
    PromptError,
    count_markers,
    detect_task,
    render,
    with_image_markers,
)
from pipeline.data.records import SkipCounter, iter_tar, parse_json
from pipeline.data.shardlists import expand_shards
from pipeline.data.tokenize import encode_prompt
from pipeline.data.transforms import (
    ImageTooLarge,
    check_image_pixels,
    decode_features,
    decode_image,
    default_mean_std,
    feature_exts,
    image_exts,
    normalise,
)


@dataclass
class EvalDataConfig(DataConfig):
    """DataConfig + what evaluation decides itself: K (the model's) and the batch size of eval_batches."""

    num_query_tokens: int = 32
    batch_size: int = 16


def default_data_config(**overrides) -> EvalDataConfig:
    """The data config of evaluation: the training defaults (system message, sqa_format, prompt_format), no
    shuffling, no packing, a max_length large enough that no prompt is truncated (the collator would otherwise drop
    long samples), plus K and the batch size of `eval_batches`. `max_len` is accepted as the old name of
    max_length."""
    if "max_len" in overrides:
        overrides["max_length"] = overrides.pop("max_len")
    kw = {"shuffle_buffer": 0, "shuffle_shards": False, "pack": False, "num_workers": 0, "max_length": 8192}
    kw.update(overrides)
    return EvalDataConfig(**kw)


def _visual_inputs(r: dict[str, Any], feat_e: list[str], img_e: list[str], cfg: DataConfig) -> dict[str, Any]:
    if feat_e:
        return {"image_features": torch.from_numpy(np.stack([decode_features(r[e], e) for e in feat_e])).float()}
    mean, std = cfg.image_mean or IMAGE_MEAN, cfg.image_std or IMAGE_STD
    imgs = [decode_image(r[e], cfg.image_size, max_pixels=cfg.max_image_pixels) for e in img_e]
    return {"pixel_values": normalise(imgs, mean, std, cfg.image_size)}


def iter_eval_samples(
    shards: str | list[str],
    tokenizer: Any,
    cfg: DataConfig,
    num_query_tokens: int,
    task: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    counter: SkipCounter | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield {input_ids (1,L), attention_mask (1,L), modality_mask (1,L), pixel_values (N,3,S,S) | image_features
    (N,K,W) with N the sample's images (0, 1 or several, in marker order), meta, target (the training answer text of
    the first turn)}, rendered in cfg.prompt_format; shard i goes to rank i % world_size."""
    counter = counter if counter is not None else SkipCounter(cfg.log_skips)
    for url in expand_shards(shards)[rank::world_size]:
        for r in parse_json(iter_tar(url, counter), counter):
            meta, key = r["json"], r["__key__"]
            t = detect_task(meta) if task == "auto" else task
            feat_e, img_e = feature_exts(r), image_exts(r)
            exts = feat_e or img_e
            try:
                conv = render(meta, _txt(r), t, len(exts), cfg)
            except (PromptError, KeyError, TypeError, AttributeError) as e:
                counter.skip(getattr(e, "reason", "bad_json"), url, key, str(e))
                continue
            if count_markers(conv) != len(exts):
                counter.skip("image_count_mismatch", url, key, f"{len(exts)} images, {count_markers(conv)} markers")
                continue
            try:
                out = _visual_inputs(r, feat_e, img_e, cfg)
            except ImageTooLarge as e:
                counter.skip("image_too_large", url, key, str(e))
                continue
            except Exception as e:  # PIL / numpy raise many types on bad bytes
                counter.skip("bad_features" if feat_e else "undecodable_image", url, key, f"{type(e).__name__}: {e}")
                continue
            enc = encode_prompt(conv, tokenizer, num_query_tokens, cfg.prompt_format)
            out.update(
                input_ids=torch.from_numpy(enc.input_ids)[None],
                attention_mask=torch.ones(1, len(enc.input_ids), dtype=torch.long),
                modality_mask=torch.from_numpy(enc.modality_mask)[None],
                meta={**meta, "key": key, "shard": url, "task": t},
                target=conv.turns[0][1],
            )
            yield out


def eval_batches(
    shards,
    tokenizer,
    data_cfg=None,
    task: str = "auto",
    batch_size: int | None = None,
    limit: int | None = None,
    counter=None,
) -> Iterator[dict]:
    """Collated batches over every sample of `shards` (pattern, list, dir or index json), in order.
    Samples the collator cannot use are skipped, logged with shard and key, and counted in `counter`
    (a pipeline.data SkipCounter; pass one to read ``counter.counts`` afterwards)."""
    cfg = data_cfg or default_data_config()
    collate = Collator(
        cfg,
        tokenizer,
        cfg.num_query_tokens,
        tuple(cfg.image_mean or IMAGE_MEAN),
        tuple(cfg.image_std or IMAGE_STD),
        with_meta=True,
    )
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


def iter_shard_prompts(
    shards,
    model,
    data_cfg=None,
    task: str = "auto",
    drop_images: bool = False,
    limit: int | None = None,
    counter=None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Prompt]:
    """Generation prompts of every usable sample of `shards`, in order, streamed (images decoded one by one), by
    iter_eval_samples: the training template and tokenisation, no answer. drop_images=True renders each prompt
    with has_image=False (ScienceQA: 'Image:N/A.') and passes no image."""
    cfg = data_cfg or default_data_config(num_query_tokens=model.cfg.num_query_tokens)
    samples = iter_eval_samples(
        shards,
        model.tokenizer,
        cfg,
        model.cfg.num_query_tokens,
        task=task,
        rank=rank,
        world_size=world_size,
        counter=counter,
    )
    for s in itertools.islice(samples, limit):
        kind = "image_features" if "image_features" in s else "pixel_values"
        images = s[kind] if s[kind].numel() else None
        meta = s["meta"]
        prompt = Prompt(
            s["input_ids"][0].tolist(),
            s["modality_mask"][0].bool().tolist(),
            images,
            image_kind=kind,
            key=str(meta.get("key", "")),
            meta=meta,
        )
        yield rerender_without_image(prompt, model, cfg) if drop_images else prompt


def shard_prompts(
    shards,
    model,
    data_cfg=None,
    drop_images: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    task: str = "auto",
    counter=None,
) -> list[Prompt]:
    """iter_shard_prompts as a list (to evaluate the same prompts twice, e.g. with and without images).
    batch_size is accepted for backward compatibility and unused (prompts are built one by one)."""
    return list(iter_shard_prompts(shards, model, data_cfg, task, drop_images, limit, counter))


def rerender_without_image(prompt: Prompt, model, data_cfg=None, prompt_format: str | None = None) -> Prompt:
    """The same sample's prompt rendered with has_image=False (ScienceQA: 'Image:N/A.'), no visual tokens, in
    prompt_format (None: the data config's)."""
    cfg = data_cfg or default_data_config(num_query_tokens=model.cfg.num_query_tokens)
    conv = render(prompt.meta, prompt.meta.get("caption"), prompt.meta.get("task", "auto"), False, cfg)
    enc = encode_prompt(conv, model.tokenizer, model.cfg.num_query_tokens, prompt_format or cfg.prompt_format)
    return Prompt(
        enc.input_ids.tolist(),
        enc.modality_mask.tolist(),
        None,
        key=prompt.key,
        meta=prompt.meta,
        answer_ids=prompt.answer_ids,
    )


def image_tensor(path: str | Path, model, max_pixels: int | None = DataConfig.max_image_pixels) -> torch.Tensor:
    """(1, 3, S, S) pixel_values with the training transform (BLIP-2 eval transform, the VPG's image size).

    ImageTooLarge (a ValueError naming the file) for an image over `max_pixels`, before decoding; ValueError naming
    the file for one that is not an image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    size = model.vpg.image_size if model.vpg is not None else 224
    mean, std = default_mean_std()
    data = path.read_bytes()
    check_image_pixels(data, max_pixels, str(path))
    try:
        arr = decode_image(data, size)
    except Exception as e:  # PIL raises many types on bytes that are not an image
        raise ValueError(f"image {path}: cannot be decoded ({type(e).__name__}: {e})") from None
    return normalise([arr], mean, std, size)


def chat_prompt(
    model, text: str, images: torch.Tensor | None = None, system: str | None = None, prompt_format: str = "auto"
) -> Prompt:
    """One user turn `text` as a generation prompt (no answer) in prompt_format (auto: from model.tokenizer):
    llama2 ``[INST] <image>\\n{text} [/INST]``, or the tokenizer's chat template up to its assistant header. The
    image marker goes first, as LLaVA's data has it; several images: one ``<image>`` per image in ``text`` (or none:
    then they all go in front), in image order. images=None: a text-only prompt (no visual positions)."""
    n = 0 if images is None else len(images)
    if n and model.vpg is None and images.dim() == 4:
        raise ValueError("an image was given but the model has no VPG: pass --vpg")
    if n > 1 and IMAGE not in text:
        text = IMAGE * n + "\n" + text
    conv = Conversation(system, with_image_markers([(text, "")], n))
    enc = encode_prompt(conv, model.tokenizer, model.cfg.num_query_tokens, prompt_format)
    kind = "image_features" if n and images.dim() == 3 else "pixel_values"
    return Prompt(enc.input_ids.tolist(), enc.modality_mask.tolist(), images if n else None, image_kind=kind)
