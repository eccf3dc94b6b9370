"""The sequence bookkeeping every method's forward shares (PILL and the peers): masks and RoPE positions
(`SeqContext`), visual tokens scattered into the sequence, the frozen layer's own pieces, and `LayerStep` (a layer
call that activation checkpointing can wrap from outside). The LM head and the loss are not here: a method returns
hidden states (pipeline.model.base.MethodOutput); the trainer's loss is pipeline.training.loss.

The frozen layer's computations are written once here, calling its submodules (`q_proj(x)`, never
`F.linear(x, q_proj.weight)`) so DeepSpeed ZeRO-3 hooks fire, with attention through pipeline.model.attention's
backends (eager / sdpa / triton).

Placeholder positions. The batch marks K placeholder positions per image (`modality_mask`). Methods whose image
does not enter the sequence (LLaMA-Adapter, Excitor) pass `hide=modality_mask` to `SeqContext.build`: those
positions are masked out as keys (no query ever attends to them) and do not advance the RoPE positions, so every
text token computes exactly what it would in the same prompt without them; the placeholders only tell which row
an image belongs to. Their own outputs are never read (their labels are -100).

Legend: B batch, T new tokens, S cached + new tokens, D model width, H query heads, Hkv key/value heads, Dh head
width, N images, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.model.attention import ATTENTION_BACKENDS, AttnMask
from pipeline.model.backends import resolve_attn_backend  # noqa: F401  (re-exported: the methods import it here)


# ---- sequence context ------------------------------------------------------------------------------------------------
@dataclass
class PeerCache:
    """The KV cache of a peer: per-layer tensors (method-specific tuples) and which cached keys are real."""

    layers: list[Any]
    key_mask: torch.Tensor  # (B, S) bool: real, visible keys (pads and hidden placeholders False)
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-method state fixed at the prompt (LaVIN's routing weights, IAA's row split)."""


@dataclass
class SeqContext:
    mask: AttnMask
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    key_mask: torch.Tensor  # (B, S) bool

    @classmethod
    def build(
        cls,
        llm: nn.Module,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        past_key_mask: torch.Tensor | None,
        use_cache: bool,
        hide: torch.Tensor | None = None,
    ) -> SeqContext:
        """Masks and RoPE for x (B, T, D). `past_key_mask` (B, S - T) bool: the cached keys that are real and
        visible (None: no cache). `hide` (B, T) bool: positions no query may attend to (see above)."""
        B, T = x.shape[:2]
        real = (
            attention_mask[:, -T:].bool()
            if attention_mask is not None
            else torch.ones(B, T, dtype=torch.bool, device=x.device)
        )
        hidden = hide is not None and bool(hide.any())
        visible = real & ~hide.bool() if hidden else real
        past = past_key_mask is not None
        key_mask = torch.cat([past_key_mask, visible], dim=1) if past else visible
        # Keys to mask: hidden placeholders, left padding (generation), or holes in the cache. Right-padded
        # batches without a cache need none (a real token never sees a later pad).
        masked = (
            hidden or ((past or use_cache) and attention_mask is not None) or (past and not bool(past_key_mask.all()))
        )
        if position_ids is None:
            if masked:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                start = past_key_mask.shape[1] if past else 0
                position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        mask = AttnMask(
            causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_padding=key_mask if masked else None
        )
        if cu_seqlens is not None:
            mask.doc_ids = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(T, device=x.device), right=True)[
                None
            ].expand(B, T)
        return cls(mask, llm.model.rotary_emb(x, position_ids), key_mask)


class LayerStep(nn.Module):
    """One layer's call of a method's layer function, as a module without parameters of its own, so activation
    checkpointing can wrap it from outside (pipeline.training.activation_checkpointing: `checkpoint_layers()`)."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn  # a bound method or function, not a submodule: parameters stay where they are

    def forward(self, *args):
        return self._fn(*args)


# ---- the frozen layer's pieces ---------------------------------------------------------------------------------------
def project_qkv(attn: nn.Module, a: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
    """q (B, T, H, Dh), k, v (B, T, Hkv, Dh) from the layer input a (B, T, D), RoPE applied to q and k.

    As the frozen layer computes them: its projections (with Qwen2's biases), Qwen3's per-head RMSNorm of q and k
    before RoPE, and the cos/sin of the model's own rotary embedding (Llama-3's rope scaling included)."""
    Dh = attn.head_dim  # unflatten, not view(B, T, -1, Dh): IAA runs its image path on zero rows in training
    q = attn.q_proj(a).unflatten(-1, (-1, Dh))
    k = attn.k_proj(a).unflatten(-1, (-1, Dh))
    v = attn.v_proj(a).unflatten(-1, (-1, Dh))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    return q, k, v


def extend(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if past is None else torch.cat([past, new], dim=1)


def frozen_layer(
    base: nn.Module,
    x: torch.Tensor,
    ctx: SeqContext,
    backend: str,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple]:
    """One unmodified Llama decoder layer (or a trainable copy of one) through our attention backends."""
    attn = base.self_attn
    q, k, v = project_qkv(attn, base.input_layernorm(x), ctx.position_embeddings)
    k, v = extend(cache and cache[0], k), extend(cache and cache[1], v)
    o = ATTENTION_BACKENDS[backend](q, k, v, None, ctx.mask, attn.scaling)
    h = x + attn.o_proj(o.flatten(2))
    return h + base.mlp(base.post_attention_layernorm(h)), (k, v)


def expand_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, S, Hkv, Dh) -> (B, S, H, Dh) for grouped-query attention."""
    rep = n_heads // t.shape[2]
    return t if rep == 1 else t.repeat_interleave(rep, dim=2)


# ---- images ---------------------------------------------------------------------------------------------------------
def image_rows(modality_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) the batch row of each image, images in row-major order (as the data pipeline lays them out)."""
    counts = modality_mask.sum(1)
    torch._assert_async((counts % k == 0).all(), "modality_mask must mark K positions per image")
    return torch.repeat_interleave(torch.arange(modality_mask.shape[0], device=modality_mask.device), counts // k)


def has_image(modality_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if modality_mask is None else modality_mask.bool().any(1)


def scatter_visual_tokens(x: torch.Tensor, modality_mask: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with the visual tokens vis (N, K, D) written at the marked positions, image after image."""
    vis = vis.to(x.dtype).reshape(-1, x.shape[-1])
    torch._assert_async(modality_mask.sum() == vis.shape[0], "modality_mask must mark exactly N_images * K tokens")
    return x.masked_scatter(modality_mask.unsqueeze(-1), vis)


def same_graph_on_every_rank() -> bool:
    """Training: a micro-batch without images must still run the visual branch (on zero images).

    DeepSpeed ZeRO-2 reduces gradients in the order their hooks fire; ranks whose graphs differ (one rank's
    micro-batch has an image, another's has none) reduce differently laid-out buckets: a collective mismatch
    (measured: gloo "Received data size doesn't match") or silently mixed gradients. With the branch run on zero
    images every rank's graph has the same trainable parameters in the same order (their gradients are zero)."""
    return torch.is_grad_enabled()


def front_end_on_every_rank(vpg: nn.Module | None, compute) -> None:
    """Run the frozen front end on one blank image, output unused, for a training micro-batch that did not run it,
    when ZeRO-3 partitions it: each of its forwards gathers the weights collectively, so a rank whose micro-batch
    holds no image (text-only rows) must run it as often as the ranks with images (measured without: gloo "Received
    data size doesn't match expected size" at the first such step). ZeRO-2 keeps frozen weights whole: a no-op."""
    if vpg is None or not same_graph_on_every_rank():
        return
    weight = next(vpg.parameters())
    if not hasattr(weight, "ds_id"):
        return
    s = vpg.image_size
    with torch.no_grad():
        compute(weight.new_zeros(1, 3, s, s))


def front_end_features(
    model: nn.Module,
    pixel_values: torch.Tensor | None,
    image_features: torch.Tensor | None,
    compute,
    empty_shape: tuple[int, ...],
    kind: str,
) -> torch.Tensor | None:
    """A batch's CLIP features: precomputed `image_features`, else `compute(pixel_values)` on the front end; with
    no image, zero rows of `empty_shape` while training (same_graph_on_every_rank) and None otherwise."""
    feats = image_features
    if feats is None and pixel_values is not None and pixel_values.numel():
        if model.vpg is None:
            raise ValueError(
                f"batch has pixel_values but {type(model).__name__} was built without a CLIP front end: "
                f"give model.vpg_path (a CLIP dir or 'tiny') or train on precomputed {kind} features"
            )
        feats = compute(pixel_values)
    else:
        front_end_on_every_rank(model.vpg, compute)
    if feats is None or feats.numel() == 0:
        if not same_graph_on_every_rank():
            return None
        feats = model.projection.weight.new_zeros(0, *empty_shape)
    return feats
