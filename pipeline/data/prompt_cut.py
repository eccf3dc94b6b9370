"""Generation prompts (`Prompt`, what pipeline.generate takes), cut from the data pipeline's own training batches.

Why cut instead of re-templating: the model must see at evaluation exactly the prompt family it was trained
on. A stage-2 training batch already holds system message, ``Image:`` + K visual tokens (or ``Image:N/A.``),
the QCM input and the generation prompt (``[/INST]``, or the chat template's assistant header), then the
answer; its labels are -100 on the prompt (HF convention: labels aligned with input_ids). So the prompt of row b
is ``input_ids[b, :first label != -100]`` and the gold answer tokens follow it. This works for whatever template
pipeline.data renders (either prompt format), with no second copy of it here.

Legend: B batch, T tokens, K visual tokens per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from pipeline.model.batch import Batch


@dataclass
class Prompt:
    """One prompt for pipeline.generate: token ids, their modality mask, and the prompt's images in order."""

    input_ids: list[int]
    modality_mask: list[bool]
    images: torch.Tensor | None = None
    """(n_images, 3, H, W) pixel_values or (n_images, K, W) Q-former features; None = no image."""
    image_kind: str = "pixel_values"
    """'pixel_values' or 'image_features': which model argument ``images`` goes to."""
    key: str = ""
    meta: dict = field(default_factory=dict)
    answer_ids: list[int] = field(default_factory=list)
    """The gold answer tokens that followed the prompt in the batch (for logit scoring)."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.modality_mask):
            raise ValueError(f"prompt {self.key}: {len(self.input_ids)} ids but {len(self.modality_mask)} mask entries")


def _image_kind(batch: Batch) -> tuple[str, torch.Tensor | None]:
    for kind in ("pixel_values", "image_features"):
        if getattr(batch, kind) is not None:
            return kind, getattr(batch, kind)
    return "pixel_values", None


def prompts_from_batch(batch: Batch, num_query_tokens: int) -> list[Prompt]:
    """Split a collated, right-padded, unpacked batch into per-sample prompts (answers cut off)."""
    for name in ("labels", "modality_mask"):
        if getattr(batch, name) is None:
            raise ValueError(f"batch has no {name}; evaluation needs stage-2 batches")
    if batch.cu_seqlens is not None:
        raise ValueError("evaluation needs unpacked batches (the loader was built with packing on)")
    ids, labels, mm = batch.input_ids.cpu(), batch.labels.cpu(), batch.modality_mask.cpu().bool()
    attn = batch.attention_mask
    attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.cpu().bool()
    kind, images = _image_kind(batch)
    metas = batch.meta or [{} for _ in range(ids.shape[0])]
    prompts, image_cursor = [], 0
    for b in range(ids.shape[0]):
        n_real = int(attn[b].sum())
        answer_pos = (labels[b, :n_real] != -100).nonzero()
        cut = int(answer_pos[0]) if len(answer_pos) else n_real
        n_visual = int(mm[b, :n_real].sum())
        if n_visual % num_query_tokens:
            raise ValueError(f"row {b}: {n_visual} visual tokens is not a multiple of K={num_query_tokens}")
        if int(mm[b, cut:n_real].sum()):
            raise ValueError(f"row {b}: visual tokens inside the answer; cannot cut the prompt before the answer")
        n_img = n_visual // num_query_tokens
        row_images = images[image_cursor : image_cursor + n_img] if images is not None and n_img else None
        image_cursor += n_img
        meta = dict(metas[b])
        if meta.get("dummy"):  # the collator's stand-in for an all-bad batch: not a sample
            continue
        prompts.append(
            Prompt(
                input_ids=ids[b, :cut].tolist(),
                modality_mask=mm[b, :cut].tolist(),
                images=row_images,
                image_kind=kind,
                key=str(meta.get("key", meta.get("__key__", ""))),
                meta=meta,
                answer_ids=ids[b, cut:n_real].tolist(),
            )
        )
    if images is not None and image_cursor != len(images):
        raise ValueError(f"batch has {len(images)} images but its modality_mask marks {image_cursor} x K tokens")
    return prompts


def iter_prompts(batches: Iterable[Batch], num_query_tokens: int, limit: int | None = None) -> Iterator[Prompt]:
    """Prompts of every batch in order, stopping after `limit` prompts."""
    n = 0
    for batch in batches:
        for prompt in prompts_from_batch(batch, num_query_tokens):
            if limit is not None and n >= limit:
                return
            n += 1
            yield prompt
