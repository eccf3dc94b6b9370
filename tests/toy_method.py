"""A toy method defined outside the package, as a user would add one: LLaVA-1's linear projector alone.

The frozen BLIP-2 Q-former's K feature rows per image go through one trainable Linear (W -> d) into the visual
token positions; every layer is the frozen LLM's own (pipeline.model.seq.frozen_layer). It exists to show, and to
test (tests/test_method_plugin.py), that a method is one file plus one `register` call: the trainer, the export,
`load_export` and generation need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from pipeline.model import register
from pipeline.model.attention import AttnBackend
from pipeline.model.base import FrozenLLMMethod, MethodConfig, MethodOutput, MethodSpec
from pipeline.model.batch import Batch
from pipeline.model.frozen import build_method, meta_builder
from pipeline.model.seq import (
    LayerStep,
    PeerCache,
    SeqContext,
    frozen_layer,
    resolve_attn_backend,
    scatter_visual_tokens,
)


@dataclass
class LinearProjectorConfig(MethodConfig):
    stage: int = 2
    vpg_width: int | None = None
    """Q-former width; None = the VPG's (768 without one)."""
    num_query_tokens: int | None = None
    """Visual tokens per image; None = the VPG's."""
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        self._check_common((1, 2))

    def take_front_end_shape(self, vpg) -> None:
        self.vpg_width = self.vpg_width or (vpg.width if vpg is not None else 768)
        self.num_query_tokens = self.num_query_tokens or (vpg.num_query_tokens if vpg is not None else 32)


class LinearProjector(FrozenLLMMethod):
    method = "linear_projector"
    supports_adapters_off = True  # off: the images are not scattered in (every layer is the frozen one anyway)

    def __init__(self, llm: nn.Module, cfg: LinearProjectorConfig, vpg=None, tokenizer=None):
        cfg.take_front_end_shape(vpg)
        super().__init__(llm, cfg, tokenizer)
        self.vpg = vpg
        self.projection = nn.Linear(cfg.vpg_width, llm.config.hidden_size)
        self.steps = nn.ModuleList(LayerStep(frozen_layer) for _ in llm.model.layers)
        self.backend: str | None = None
        self.llm.requires_grad_(False)
        self.set_stage(cfg.stage)

    def is_trainable(self, name: str, stage: int) -> bool:
        return name.startswith("projection.")

    def forward(self, batch: Batch, *, cache: PeerCache | None = None, use_cache: bool = False) -> MethodOutput:
        self.backend = self.backend or resolve_attn_backend(self.cfg.attn_backend, batch.input_ids.device)
        x = self.llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        feats = batch.image_features
        if feats is None and batch.pixel_values is not None and batch.pixel_values.numel():
            feats = self.vpg(batch.pixel_values)
        if feats is not None and feats.numel() and self.adapters_enabled:
            x = scatter_visual_tokens(x, batch.modality_mask.bool(), self.projection(feats.to(x.dtype)))
        ctx = SeqContext.build(
            self.llm,
            x,
            batch.attention_mask,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            cache.key_mask if cache is not None else None,
            use_cache,
        )
        layers = []
        for i, base in enumerate(self.llm.model.layers):
            x, kv = self.steps[i](base, x, ctx, self.backend, cache.layers[i] if cache is not None else None)
            layers.append(kv)
        return MethodOutput(
            hidden=self.llm.model.norm(x), kv_cache=PeerCache(layers, ctx.key_mask) if use_cache else None
        )


SPEC = register(
    MethodSpec(
        "linear_projector",
        LinearProjector,
        LinearProjectorConfig,
        partial(build_method, LinearProjector, "blip2"),
        meta_builder(LinearProjector, "blip2"),
        front_end="blip2",
        published="LLaVA-1 stage 1: W x d (a test's toy)",
    )
)
