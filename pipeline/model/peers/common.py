"""What the four peers' forwards share: the batch's masks and RoPE (`seq_context`), the modality mask, and the frozen
LLM they become under `adapters_off()` (`frozen_forward`).

Placeholders. LLaMA-Adapter and Excitor do not put the image into the sequence: they pass `hide=modality_mask`
to `seq_context`, so the K placeholder positions per image are masked out as keys and do not advance RoPE
positions (pipeline.model.seq); they only say which row an image belongs to.

Adapters off. `frozen_forward` runs the batch's token ids through the frozen layers as transformers would (the
placeholders are the LLM's tokens, no image is read, no extra token is prepended), through the method's own
attention backend, with a KV cache of its own layout ({"frozen": True} in `PeerCache.extra`): a cache written
with the adapters on cannot continue with them off, nor the other way round.

Legend: B batch, T new tokens, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.base import MethodOutput
from pipeline.model.batch import Batch
from pipeline.model.seq import PeerCache, SeqContext, frozen_layer


def modality(batch: Batch) -> torch.Tensor:
    """(B, T) bool: the batch's visual-token positions (all False without an image)."""
    mm = batch.modality_mask
    return (mm if mm is not None else torch.zeros_like(batch.input_ids, dtype=torch.bool)).bool()


def seq_context(
    llm: nn.Module,
    x: torch.Tensor,
    batch: Batch,
    cache: PeerCache | None,
    use_cache: bool,
    hide: torch.Tensor | None = None,
    packed: bool = True,
) -> SeqContext:
    """SeqContext of x (B, T, D) for `batch`, continuing `cache`; `packed=False`: the method ignores cu_seqlens
    (it refused them before)."""
    return SeqContext.build(
        llm,
        x,
        batch.attention_mask,
        batch.position_ids,
        batch.cu_seqlens if packed else None,
        batch.max_seqlen if packed else None,
        cache.key_mask if cache is not None else None,
        use_cache,
        hide=hide,
    )


def check_cache(cache: PeerCache | None, frozen: bool, method: str) -> None:
    """A cache continues only the mode (adapters on or off) that wrote it."""
    if cache is not None and bool(cache.extra.get("frozen", False)) != frozen:
        wrote, now = ("off", "on") if not frozen else ("on", "off")
        raise ValueError(
            f"{method}: this KV cache was written with the adapters {wrote}; it cannot be continued with them {now}"
        )


def frozen_forward(
    llm: nn.Module, backend: str, batch: Batch, cache: PeerCache | None, use_cache: bool, method: str
) -> MethodOutput:
    """The frozen LLM alone on the batch's token ids: what every peer computes under adapters_off()."""
    check_cache(cache, True, method)
    x = llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
    ctx = seq_context(llm, x, batch, cache, use_cache)
    layers = []
    for i, base in enumerate(llm.model.layers):
        x, kv = frozen_layer(base, x, ctx, backend, cache.layers[i] if cache is not None else None)
        layers.append(kv)
    kv_cache = PeerCache(layers, ctx.key_mask, {"frozen": True}) if use_cache else None
    return MethodOutput(hidden=llm.model.norm(x), kv_cache=kv_cache)
