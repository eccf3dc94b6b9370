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

from functools import partial
from typing import Any

import torch
from torch import nn

from pipeline.model.base import FrozenLLMMethod, MethodOutput, MethodSpec
from pipeline.model.batch import Batch
from pipeline.model.clip import check_layers, evenly_spaced_layers
from pipeline.model.frozen import build_method, check_llm, meta_builder
from pipeline.model.seq import PeerCache, SeqContext, frozen_layer, resolve_attn_backend

VIT_L_LAYERS, VIT_L_WIDTH, VIT_L_PATCHES = 24, 1024, 256  # CLIP ViT-L/14 at 224 px: shapes without a front end


def take_cls_shape(cfg: Any, clip: Any, n_default: int, what: str) -> None:
    """Fill a CLS-reading config's sizes from the CLIP front end (ViT-L/14 without one): `clip_layers` (n_default
    evenly spaced blocks ending at the last), `vision_width`, and `num_query_tokens` = one `what` per listed block
    (a different value is an error naming the field)."""
    depth = clip.num_layers if clip is not None else VIT_L_LAYERS
    if cfg.clip_layers is None:
        cfg.clip_layers = evenly_spaced_layers(depth, min(n_default, depth))
    check_layers(cfg.clip_layers, depth, f"{type(cfg).__name__}.clip_layers")
    if cfg.vision_width is None:
        cfg.vision_width = clip.width if clip is not None else VIT_L_WIDTH
    if cfg.num_query_tokens is None:
        cfg.num_query_tokens = len(cfg.clip_layers)
    cfg._check(
        cfg.num_query_tokens == len(cfg.clip_layers),
        "num_query_tokens",
        f"must equal len(clip_layers)={len(cfg.clip_layers)} (one {what} per CLS)",
    )


class PeerMethod(FrozenLLMMethod):
    """Base of the four peers. A subclass builds its modules between `super().__init__` and `self.freeze()`,
    defines `adapted(batch, cache, use_cache)` (its forward with the adapters on) and, when it uses `run_layers`,
    a `steps` ModuleList of LayerStep(fn(i, base, x, ctx, state, past) -> (x, kv))."""

    supports_adapters_off = True

    def __init__(self, llm: nn.Module, cfg: Any, vpg: Any = None, tokenizer: Any = None):
        check_llm(llm.config, source=f"{type(self).__name__}(llm=...)")
        cfg.take_front_end_shape(vpg)
        super().__init__(llm, cfg, tokenizer)
        self.vpg = vpg  # the frozen CLIP front end (pipeline.model.clip); None: precomputed features
        self.backend: str | None = None
        """Attention backend (eager | sdpa | triton), resolved from cfg.attn_backend at the first forward."""

    def freeze(self) -> None:
        """The end of a subclass's __init__: the LLM frozen, requires_grad on the stage's trainable set."""
        self.llm.requires_grad_(False)
        self.set_stage(self.cfg.stage)

    def forward(self, batch: Batch, *, cache: PeerCache | None = None, use_cache: bool = False) -> MethodOutput:
        """Final-normed hidden states (B, T, D) of the batch; `cache`: the previous call's `kv_cache`. Under
        adapters_off() the frozen LLM on the batch's token ids (frozen_forward)."""
        if self.backend is None:
            self.backend = resolve_attn_backend(self.cfg.attn_backend, batch.input_ids.device)
        if not self.adapters_enabled:
            return frozen_forward(self.llm, self.backend, batch, cache, use_cache, self.method)
        check_cache(cache, False, self.method)
        return self.adapted(batch, cache, use_cache)

    def adapted(self, batch: Batch, cache: PeerCache | None, use_cache: bool) -> MethodOutput:
        raise NotImplementedError(f"{type(self).__name__} must define adapted(batch, cache, use_cache)")

    def run_layers(self, x: torch.Tensor, ctx: SeqContext, state: Any, cache: PeerCache | None):
        """x (B, T, D) through every layer's step with the method's per-batch `state`: (x, per-layer caches)."""
        layers = []
        for i, base in enumerate(self.llm.model.layers):
            x, kv = self.steps[i](i, base, x, ctx, state, cache.layers[i] if cache is not None else None)
            layers.append(kv)
        return x, layers

    def output(
        self, x: torch.Tensor, ctx: SeqContext, layers: list, extra: dict, use_cache: bool, gate_abs=None
    ) -> MethodOutput:
        """The contract's output: the LLM's final norm of x, and with use_cache the layers' caches + `extra`."""
        kv_cache = PeerCache(layers, ctx.key_mask, extra) if use_cache else None
        return MethodOutput(hidden=self.llm.model.norm(x), gate_abs=gate_abs, kv_cache=kv_cache)

    def layer_gate_abs(self, first_adapted: int, per_adapted: torch.Tensor) -> torch.Tensor:
        """(n_layers,) mean |gate| per layer from the adapted top layers' values (0 below `first_adapted`)."""
        g = torch.zeros(len(self.llm.model.layers), device=per_adapted.device)
        g[first_adapted:] = per_adapted.detach()
        return g


def clip_peer_spec(
    model_cls: type[PeerMethod], config_cls: type, published: str, stages: tuple[int, ...]
) -> MethodSpec:
    """A peer's entry in pipeline.model.methods: every peer reads the CLIP front end, so its name, loader and meta
    builder all follow from the class."""
    return MethodSpec(
        model_cls.method,
        model_cls,
        config_cls,
        partial(build_method, model_cls, "clip"),
        meta_builder(model_cls, "clip"),
        front_end="clip",
        published=published,
        stages=stages,
    )


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
