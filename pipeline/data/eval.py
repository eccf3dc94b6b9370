"""Evaluation input: every sample of a shard set once, in order, as a generation prompt (no answer).

The prompt is built by the same template + tokenisation code as training (`encode_prompt`), so generation starts
exactly where the training answer started. Bad samples are skipped and counted in `counter` like in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.constants import IMAGE_MEAN, IMAGE_STD
from pipeline.data.collate import _txt
from pipeline.data.config import DataConfig
from pipeline.data.prompts import PromptError, count_markers, detect_task, render
from pipeline.data.records import SkipCounter, iter_tar, parse_json
from pipeline.data.shardlists import expand_shards
from pipeline.data.tokenize import encode_prompt
from pipeline.data.transforms import decode_features, decode_image, feature_exts, image_exts, normalise


def iter_eval_samples(shards: str | list[str], tokenizer: Any, cfg: DataConfig, num_query_tokens: int,
                      task: str = "auto", rank: int = 0, world_size: int = 1, counter: SkipCounter | None = None,
                      ) -> Iterator[dict[str, Any]]:
    """Yield {input_ids (1,L), attention_mask (1,L), modality_mask (1,L), pixel_values (N,3,S,S) | image_features
    (N,K,W) with N the sample's images (0, 1 or several, in marker order), meta, target (the training answer text of
    the first turn)}; shard i goes to rank i % world_size."""
    counter = counter if counter is not None else SkipCounter(cfg.log_skips)
    mean, std = cfg.image_mean or IMAGE_MEAN, cfg.image_std or IMAGE_STD
    urls = expand_shards(shards)[rank::world_size]
    for url in urls:
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
            out: dict[str, Any] = {}
            try:
                if feat_e:
                    out["image_features"] = torch.from_numpy(np.stack([decode_features(r[e], e) for e in feat_e])
                                                             ).float()
                else:
                    out["pixel_values"] = normalise([decode_image(r[e], cfg.image_size) for e in img_e], mean, std,
                                                    cfg.image_size)
            except Exception as e:  # PIL / numpy raise many types on bad bytes
                counter.skip("bad_features" if feat_e else "undecodable_image", url, key, f"{type(e).__name__}: {e}")
                continue
            enc = encode_prompt(conv, tokenizer, num_query_tokens)
            out.update(input_ids=torch.from_numpy(enc.input_ids)[None],
                       attention_mask=torch.ones(1, len(enc.input_ids), dtype=torch.long),
                       modality_mask=torch.from_numpy(enc.modality_mask)[None],
                       meta={**meta, "key": key, "shard": url, "task": t}, target=conv.turns[0][1])
            yield out
