"""PILL plugged into a frozen transformers Llama-family causal LM.

The frozen LLM keeps its weights, rotary embedding, norms, FFN and tokenizer; PILL owns the decoder-layer
forward (pipeline.model.block) so that its adapters and gate sit exactly where docs/model.md puts them. Visual
tokens: each image's K Q-former features, projected by P, overwrite the K placeholder positions that
`modality_mask` marks, image after image in row-major (batch, then time) order.

Legend: B batch, T tokens, D d_model, N images, K visual tokens per image, W Q-former width, V vocab.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pipeline.model.adapters import RouteSchedules
from pipeline.model.backends import resolve_backends
from pipeline.model.base import FrozenLLMMethod, MethodOutput, MethodSpec
from pipeline.model.batch import Batch
from pipeline.model.block import KVCache, PILLBlock
from pipeline.model.config import PILLConfig
from pipeline.model.frozen import VPGSource, build_method, check_llm, meta_builder
from pipeline.model.seq import SeqContext, front_end_on_every_rank, same_graph_on_every_rank, scatter_visual_tokens
from pipeline.model.vpg import VPG

_STAGE_MODULES = {
    1: ("adapter_v", "adapter_ffn"),
    2: ("adapter_v", "adapter_t", "adapter_ffn", "attn_adapter", "gate"),
}


def is_trainable(name: str, stage: int) -> bool:
    """The one predicate that decides both requires_grad and what save_adapter writes."""
    if name.startswith("projection."):
        return True
    m = re.match(r"blocks\.\d+\.([a-z_]+)\.", name)
    return bool(m) and m.group(1) in _STAGE_MODULES[stage]


class PILL(FrozenLLMMethod):
    method = "pill"
    config_key = "pill_config"  # the export format's historical key (DESIGN.md: adapter_config.json)
    supports_adapters_off = True

    def __init__(self, llm: nn.Module, cfg: PILLConfig, vpg: VPG | None = None, tokenizer=None):
        check_llm(llm.config, source="PILL(llm=...)")
        cfg.take_front_end_shape(vpg)
        if vpg is not None and (vpg.width != cfg.vpg_width or vpg.num_query_tokens != cfg.num_query_tokens):
            raise ValueError(
                f"VPG gives {vpg.num_query_tokens} x {vpg.width} features per image but PILLConfig expects "
                f"num_query_tokens={cfg.num_query_tokens}, vpg_width={cfg.vpg_width} (the projection P's input)"
            )
        super().__init__(llm, cfg, tokenizer)
        self.vpg = vpg
        self.backends: tuple[str, str] | None = None  # (attention, adapter), resolved at the first forward
        # Mistral's sliding window: the backends are full causal, equal to the frozen model within the window only.
        self.sliding_window = (
            getattr(llm.config, "sliding_window", None) if getattr(llm.config, "use_sliding_window", True) else None
        )
        c = llm.config
        self.projection = nn.Linear(cfg.vpg_width, c.hidden_size, bias=False)
        nn.init.normal_(self.projection.weight, std=cfg.projection_init_std)
        n = c.num_hidden_layers
        self.blocks = nn.ModuleList(
            PILLBlock(cfg, c.hidden_size, c.num_attention_heads, is_last=(i == n - 1)) for i in range(n)
        )
        self.llm.requires_grad_(False)
        self.set_stage(cfg.stage)
        self.train(self.training)

    # ---- stages and parameters -----------------------------------------------------------------------------------
    def is_trainable(self, name: str, stage: int) -> bool:
        return is_trainable(name, stage)

    def set_stage(self, stage: int) -> None:
        """requires_grad on exactly the stage's trainable set (docs/model.md's table); the rest is frozen."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        super().set_stage(stage)

    # ---- forward -------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None):
        """(N, K, W) Q-former features, or None when the batch has no image."""
        if image_features is not None:
            return image_features if image_features.numel() else None
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        if self.vpg is None:
            raise ValueError(
                "batch has pixel_values but the model was built without a VPG: give vpg_path, "
                "or train on precomputed-feature shards (python -m shards.encode)"
            )
        return self.vpg(pixel_values)

    def embed(self, input_ids: torch.Tensor, modality_mask: torch.Tensor, pixel_values, image_features):
        """(B, T, D) token embeddings with the projected visual tokens at the positions modality_mask marks."""
        x = self.llm.get_input_embeddings()(input_ids)
        feats = self.encode_images(pixel_values, image_features)  # (N, K, W)
        if not (image_features is None and pixel_values is not None and pixel_values.numel()):
            front_end_on_every_rank(self.vpg, self.vpg)  # ZeRO-3: the partitioned VPG runs on every rank
        if feats is not None:
            return scatter_visual_tokens(x, modality_mask, self.projection(feats.to(self.projection.weight.dtype)))
        if same_graph_on_every_rank() and self.projection.weight.requires_grad:
            # No image in this micro-batch: P still takes part (on zero rows, a zero gradient), so every rank's
            # backward fires the same gradient hooks in the same order (ZeRO-2 reduces in that order).
            x = x + self.projection(x.new_zeros(0, self.cfg.vpg_width, dtype=self.projection.weight.dtype)).sum()
        return x

    def resolve_backends(self, device: torch.device) -> tuple[str, str]:
        if self.backends is None:
            self.backends = resolve_backends(self.cfg, device, zero3=hasattr(self.projection.weight, "ds_id"))
            for block in self.blocks:
                block.attn_backend, block.adapter_backend = self.backends
        return self.backends

    def check_window(self, n_tokens: int) -> None:
        if self.sliding_window is not None and n_tokens > self.sliding_window:
            raise ValueError(
                f"sequence of {n_tokens} tokens exceeds the LLM's sliding_window={self.sliding_window}: "
                "PILL's attention is full causal and would differ from the frozen model beyond it; keep "
                "sequences (data.max_length, prompt + generation) within it"
            )

    def forward(self, batch: Batch, *, cache: list[KVCache] | None = None, use_cache: bool = False) -> MethodOutput:
        """Final-normed hidden states (B, T, D) of the batch; `cache`: the previous call's `kv_cache` (generation:
        `batch.attention_mask` then spans the cached + new tokens). Under adapters_off() every layer is the frozen
        one and the images are not read."""
        input_ids = batch.input_ids  # (B, T)
        attn_backend, adapter_backend = self.resolve_backends(input_ids.device)
        B, T = input_ids.shape
        plugged = self.adapters_enabled
        mm = batch.modality_mask
        modality_mask = (mm if mm is not None and plugged else torch.zeros_like(input_ids)).bool()
        if plugged:
            x = self.embed(input_ids, modality_mask, batch.pixel_values, batch.image_features)
        else:
            x = self.llm.get_input_embeddings()(input_ids)
        past = cache[0][0].shape[1] if cache else 0
        self.check_window(past + T)
        max_seqlen = batch.max_seqlen
        if batch.cu_seqlens is not None and max_seqlen is None and attn_backend == "triton":
            max_seqlen = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())  # one sync per forward
        past_key_mask = _past_key_mask(batch.attention_mask, B, past, T, x.device) if cache else None
        ctx = SeqContext.build(
            self.llm,
            x,
            batch.attention_mask,
            batch.position_ids,
            batch.cu_seqlens,
            max_seqlen,
            past_key_mask,
            use_cache,
        )
        schedules = RouteSchedules(modality_mask) if adapter_backend == "triton" and plugged else None
        new_cache, gates = [], []
        for i, (block, base) in enumerate(zip(self.blocks, self.llm.model.layers)):
            x, layer_cache, gate_abs = block(
                x,
                base,
                ctx.position_embeddings,
                modality_mask,
                ctx.mask,
                cache[i] if cache else None,
                schedules,
                plugged,
            )
            new_cache.append(layer_cache)
            gates.append(gate_abs)
        return MethodOutput(
            hidden=self.llm.model.norm(x),
            kv_cache=new_cache if use_cache else None,
            gate_abs=torch.stack(gates) if gates[0] is not None else None,
        )


def _past_key_mask(attention_mask: torch.Tensor | None, B: int, past: int, T: int, device) -> torch.Tensor:
    """(B, past) bool: the cached keys that are real (left padding from the attention mask, else all)."""
    if attention_mask is not None:
        return attention_mask[:, :past].bool()
    return torch.ones(B, past, dtype=torch.bool, device=device)


def load_pill(
    llm_path: str | Path,
    vpg_path: VPGSource = None,
    cfg: PILLConfig | None = None,
    dtype: torch.dtype | None = None,
    adapter_path: str | Path | None = None,
    device: torch.device | str | None = None,
) -> PILL:
    """The frozen LLM + VPG from local paths with PILL's trainable modules (fresh, or from `adapter_path`).

    K and the Q-former width left as None in `cfg` are taken from the VPG."""
    return build_method(
        PILL, "blip2", llm_path, vpg_path, cfg or PILLConfig(), dtype=dtype, adapter_path=adapter_path, device=device
    )


def group_of(name: str) -> str:
    """pipeline.params' row of a trainable parameter: the module in docs/model.md's notation."""
    if name.startswith("projection."):
        return "projection P"
    m = re.match(r"blocks\.\d+\.([a-z_]+)\.", name)
    return {
        "adapter_v": "A_v (visual FFN expert)",
        "adapter_t": "A_t (text FFN expert)",
        "adapter_ffn": "A_ffn (shared FFN adapter)",
        "attn_adapter": "A_attn (attention adapter)",
        "gate": "W_g (MAG gate)",
    }.get(m.group(1) if m else "", "other")


SPEC = MethodSpec(
    "pill",
    PILL,
    PILLConfig,
    lambda llm, vpg, cfg, **kw: load_pill(llm, vpg, cfg, **kw),
    meta_builder(PILL, "blip2"),
    front_end="blip2",
    group_of=group_of,
    layer_memory_model=True,
    published="paper: 43M at LLaMA-2-7B (Table 1); 3 adapters x 3dr + d x n_heads per layer + 768 d (the spec's "
    "count, about 45M)",
)
