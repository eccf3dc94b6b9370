"""Stage: a group of raw records -> one model batch (decode, prompt, tokenise, pad or pack).

Runs inside the DataLoader worker on the whole group, so tokenisation is one batched call and image normalisation one
tensor op. A record that fails here (undecodable image, bad features, unusable json, too long) is dropped from its
batch and counted; batches therefore hold between 1 and batch_size samples. A batch whose every record failed becomes
one dummy text row (`num_samples == 0`, loss on a single EOS) so that every rank still steps together.

The result is a `pipeline.model.batch.Batch` (docs/data.md): input_ids, attention_mask, labels, modality_mask,
exactly one of pixel_values (N,3,S,S) / image_features (N,K,W), source (the data source of each sample),
num_samples (0 for the dummy row); packed batches add cu_seqlens (B'+1,) int32 and position_ids (1,T).
with_meta=True (evaluation, tests) adds meta: one dict per sample (key, shard, task + the json fields;
`({"dummy": True},)` for the dummy row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.chat_template import TemplateError
from pipeline.data.config import DataConfig
from pipeline.data.prompts import PromptError, count_markers, detect_task, render, resolve_prompt_format
from pipeline.data.records import SkipCounter
from pipeline.data.tokenize import IGNORE, Encoded, conversation_pieces, encode_pieces
from pipeline.data.transforms import (
    ImageTooLarge,
    decode_features,
    decode_image,
    feature_exts,
    image_exts,
    normalise,
    unsupported_image_ext,
)
from pipeline.model.batch import Batch


class Collator:
    def __init__(
        self, cfg: DataConfig, tokenizer: Any, num_query_tokens: int, mean: tuple, std: tuple, with_meta: bool = False
    ):
        self.cfg, self.tok, self.mean, self.std = cfg, tokenizer, mean, std
        self.K, self.with_meta = num_query_tokens, with_meta
        self.prompt_format = resolve_prompt_format(cfg.prompt_format, tokenizer)  # llama2 | chat_template
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)

    def __call__(self, records: list[dict[str, Any]], counter: SkipCounter) -> Batch:
        kept, pieces, visuals = [], [], []
        for r in records:
            item = self._prepare(r, counter)
            if item is not None:
                kept.append(r)
                pieces.append(item[0])
                visuals.append(item[1])
        encoded = encode_pieces(pieces, self.tok, self.K, self.cfg.max_length) if pieces else []
        rows: list[Encoded] = []
        images: list[np.ndarray] = []
        meta: list[dict[str, Any]] = []
        sources: list[int] = []
        for r, enc, vis in zip(kept, encoded, visuals):
            if enc is None:
                _skip(counter, r, "too_long", f"max_length={self.cfg.max_length}")
                continue
            if enc.cut_tokens and not self._overflow(r, enc, counter):
                continue
            rows.append(enc)
            sources.append(r.get("__source__", 0))
            images += vis[: enc.n_images]  # images cut by truncation leave with their positions
            if self.with_meta:  # the loader's fields win: ScienceQA's json has a `task` of its own
                meta.append({**r["json"], "key": r["__key__"], "shard": r["__shard__"], "task": r["__task__"]})
        if not rows:
            counter.skip("empty_batch", records[0]["__shard__"] if records else "", "", "every record failed")
            return self._dummy()
        kinds = {"features" if v.ndim == 2 else "pixels" for v in images}
        if len(kinds) > 1:
            raise ValueError(
                "a batch mixes pixel and feature samples; mix sources of one kind only "
                f"(shards {sorted({r['__shard__'] for r in kept})})"
            )
        batch = self._pack(rows) if self.cfg.pack else self._pad(rows)
        if kinds == {"features"}:
            batch["image_features"] = torch.from_numpy(np.stack(images)).float()
        else:
            batch["pixel_values"] = normalise(images, self.mean, self.std, self.cfg.image_size)
        return Batch(
            **batch,
            source=torch.tensor(sources, dtype=torch.long),
            num_samples=len(rows),
            meta=tuple(meta) if self.with_meta else None,
        )

    def _overflow(self, r: dict[str, Any], enc: Encoded, counter: SkipCounter) -> bool:
        """A sample longer than max_length, by data.on_overflow: True to keep it truncated (counted per source)."""
        detail = f"{enc.cut_tokens} tokens ({enc.cut_answer_tokens} answer) past max_length={self.cfg.max_length}"
        if self.cfg.on_overflow == "error":
            raise ValueError(f"{r['__shard__']} key {r['__key__']}: {detail} (data.on_overflow=error)")
        if self.cfg.on_overflow == "skip":
            _skip(counter, r, "too_long", detail)
            return False
        counter.truncated(r.get("__source__", 0), enc.cut_answer_tokens, r["__shard__"], r["__key__"], detail)
        return True

    def _prepare(self, r: dict[str, Any], counter: SkipCounter) -> tuple[list[tuple], list[np.ndarray]] | None:
        """Prompt pieces and decoded visual inputs (in marker order) of one record, or None (counted)."""
        meta = r["json"]
        task = r.get("__task__", "auto")
        task = detect_task(meta) if task == "auto" else task
        r["__task__"] = task
        img_e, feat_e = image_exts(r), feature_exts(r)
        if self.cfg.image_input == "pixels":
            feat_e = []
        elif self.cfg.image_input == "features":
            img_e = []
        exts = feat_e or img_e
        if not exts and self.cfg.image_input != "features" and unsupported_image_ext(r):
            return _skip(counter, r, "unsupported_image", f"member .{unsupported_image_ext(r)}")
        if (meta.get("has_image") or task == "caption") and not exts:
            return _skip(counter, r, "missing_image", "")
        listed = meta.get("image")
        if isinstance(listed, list) and exts and len(listed) != len(exts):
            return _skip(counter, r, "image_count_mismatch", f"json lists {len(listed)} images, tar has {len(exts)}")
        try:
            conv = render(meta, _txt(r), task, len(exts), self.cfg)
        except (PromptError, KeyError, TypeError, AttributeError) as e:
            return _skip(counter, r, getattr(e, "reason", "bad_json"), str(e))
        if count_markers(conv) != len(exts):  # the model scatters exactly one image per marker
            return _skip(counter, r, "image_count_mismatch", f"{len(exts)} images, {count_markers(conv)} markers")
        visual: list[np.ndarray] = []
        for e in exts:
            try:
                if feat_e:
                    f = decode_features(r[e], e)
                    if f.shape[0] != self.K:
                        raise ValueError(f"{f.shape[0]} query tokens, expected {self.K}")
                    visual.append(f)
                else:
                    visual.append(decode_image(r[e], self.cfg.image_size, max_pixels=self.cfg.max_image_pixels))
            except ImageTooLarge as err:
                return _skip(counter, r, "image_too_large", f".{e}: {err}")
            except Exception as err:  # numpy / torch / PIL raise many types on bad bytes
                reason = "bad_features" if feat_e else "undecodable_image"
                return _skip(counter, r, reason, f".{e}: {type(err).__name__}: {err}")
        try:
            return conversation_pieces(conv, prompt_format=self.prompt_format, tokenizer=self.tok), visual
        except TemplateError as e:  # a template problem is the config's, not the sample's: stop with its name
            raise ValueError(f"data.prompt_format={self.cfg.prompt_format}: {e}") from e

    def _pad(self, rows: list[Encoded]) -> dict[str, Any]:
        B, T = len(rows), max(len(e.input_ids) for e in rows)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        mm = np.zeros((B, T), dtype=bool)
        att = np.zeros((B, T), dtype=np.int64)
        for i, e in enumerate(rows):
            n = len(e.input_ids)
            ids[i, :n], labels[i, :n], mm[i, :n], att[i, :n] = e.input_ids, e.labels, e.modality_mask, 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(att),
            "labels": torch.from_numpy(labels),
            "modality_mask": torch.from_numpy(mm),
        }

    def _pack(self, rows: list[Encoded]) -> dict[str, Any]:
        lens = np.array([len(e.input_ids) for e in rows])
        cu = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        total = int(cu[-1])
        pos = np.arange(total) - np.repeat(cu[:-1], lens)  # restarts at 0 at every sample
        cat = {k: np.concatenate([getattr(e, k) for e in rows])[None] for k in ("input_ids", "labels", "modality_mask")}
        return {
            "input_ids": torch.from_numpy(cat["input_ids"]),
            "attention_mask": torch.ones(1, total, dtype=torch.long),
            "labels": torch.from_numpy(cat["labels"]),
            "modality_mask": torch.from_numpy(cat["modality_mask"]),
            "cu_seqlens": torch.from_numpy(cu),
            "position_ids": torch.from_numpy(pos[None].astype(np.int64)),
        }

    def _dummy(self) -> Batch:
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        bos = eos if bos is None else bos  # ChatML tokenizers (Qwen, SmolLM2) have no bos
        return Batch(
            input_ids=torch.tensor([[bos, eos]]),
            attention_mask=torch.ones(1, 2, dtype=torch.long),
            labels=torch.tensor([[IGNORE, eos]]),
            modality_mask=torch.zeros(1, 2, dtype=torch.bool),
            pixel_values=torch.empty(0, 3, self.cfg.image_size, self.cfg.image_size),
            cu_seqlens=torch.tensor([0, 2], dtype=torch.int32) if self.cfg.pack else None,
            position_ids=torch.arange(2)[None] if self.cfg.pack else None,
            source=torch.zeros(1, dtype=torch.long),
            num_samples=0,
            meta=({"dummy": True},) if self.with_meta else None,
        )


def _skip(counter: SkipCounter, r: dict[str, Any], reason: str, detail: str) -> None:
    """Count a dropped record (once per epoch, by the slot that owns it: `__count__`)."""
    counter.skip(reason, r["__shard__"], r["__key__"], detail, count=r.get("__count__", True))


def _txt(r: dict[str, Any]) -> str | None:
    raw = r.get("txt")
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")
