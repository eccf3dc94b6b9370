"""Evaluation input: every sample of a shard set once, in order, as a generation prompt (no answer).

The prompt is built by the same template + tokenisation code as training (`encode_prompt`), so generation starts
exactly where the training answer started. Bad samples are skipped and counted in `counter` like in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipeline.constants import IMAGE_MEAN, IMAGE_STD
from pipeline.data.collate import _txt
from pipeline.data.config import DataConfig
from pipeline.data.prompts import PromptError, detect_task, render
from pipeline.data.records import SkipCounter, iter_tar, parse_json
from pipeline.data.shardlists import expand_shards
from pipeline.data.tokenize import encode_prompt
from pipeline.data.transforms import decode_features, decode_image, feature_ext, image_ext, normalise


def iter_eval_samples(shards: str | list[str], tokenizer: Any, cfg: DataConfig, num_query_tokens: int,
                      task: str = "auto", rank: int = 0, world_size: int = 1, counter: SkipCounter | None = None,
                      ) -> Iterator[dict[str, Any]]:
    """Yield {input_ids (1,L), attention_mask (1,L), modality_mask (1,L), pixel_values (N,3,S,S) | image_features
    (N,K,W), meta, target (the training answer text of the first turn)}; shard i goes to rank i % world_size."""
    counter = counter if counter is not None else SkipCounter(cfg.log_skips)
    mean, std = cfg.image_mean or IMAGE_MEAN, cfg.image_std or IMAGE_STD
    urls = expand_shards(shards)[rank::world_size]
    for url in urls:
        for r in parse_json(iter_tar(url, counter), counter):
            meta, key = r["json"], r["__key__"]
            t = detect_task(meta) if task == "auto" else task
            img_e, feat_e = image_ext(r), feature_ext(r)
            visual = img_e is not None or feat_e is not None
            try:
                conv = render(meta, _txt(r), t, visual, cfg)
            except (PromptError, KeyError, TypeError, AttributeError) as e:
                counter.skip(getattr(e, "reason", "bad_json"), url, key, str(e))
                continue
            out: dict[str, Any] = {}
            try:
                if feat_e is not None:
                    out["image_features"] = torch.from_numpy(decode_features(r[feat_e], feat_e)).float()[None]
                elif img_e is not None:
                    out["pixel_values"] = normalise([decode_image(r[img_e], cfg.image_size)], mean, std,
                                                    cfg.image_size)
                else:
                    out["pixel_values"] = torch.empty(0, 3, cfg.image_size, cfg.image_size)
            except Exception as e:  # PIL / numpy raise many types on bad bytes
                counter.skip("undecodable_image" if img_e else "bad_features", url, key, f"{type(e).__name__}: {e}")
                continue
            enc = encode_prompt(conv, tokenizer, num_query_tokens)
            out.update(input_ids=torch.from_numpy(enc.input_ids)[None],
                       attention_mask=torch.ones(1, len(enc.input_ids), dtype=torch.long),
                       modality_mask=torch.from_numpy(enc.modality_mask)[None],
                       meta={"key": key, "shard": url, "task": t, **meta}, target=conv.turns[0][1])
            yield out
