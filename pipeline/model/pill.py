"""PILL plugged into a frozen transformers Llama-family causal LM.

The frozen LLM keeps its weights, rotary embedding, norms, FFN and tokenizer; PILL owns the decoder-layer
forward (pipeline.model.block) so that its adapters and gate sit exactly where docs/model.md puts them. Visual
tokens: each image's K Q-former features, projected by P, overwrite the K placeholder positions that
`modality_mask` marks, image after image in row-major (batch, then time) order.

Legend: B batch, T tokens, D d_model, N images, K visual tokens per image, W Q-former width, V vocab.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.constants import image_placeholder_id  # noqa: F401  (re-exported: the model's placeholder rule)
from pipeline.model.adapters import RouteSchedules
from pipeline.model.attention import AttnMask
from pipeline.model.backends import resolve_backends
from pipeline.model.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FrozenLLMMethod, MethodOutput  # noqa: F401
from pipeline.model.block import KVCache, PILLBlock
from pipeline.model.config import PILLConfig
from pipeline.model.vpg import VPG

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
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


PILLOutput = MethodOutput


class PILL(FrozenLLMMethod):
    method = "pill"

    def __init__(self, llm: nn.Module, cfg: PILLConfig, vpg: VPG | None = None, tokenizer=None):
        check_llm(llm.config, source="PILL(llm=...)")
        cfg.take_vpg_shape(vpg)
        if vpg is not None and (vpg.width != cfg.vpg_width or vpg.num_query_tokens != cfg.num_query_tokens):
            raise ValueError(
                f"VPG gives {vpg.num_query_tokens} x {vpg.width} features per image but PILLConfig expects "
                f"num_query_tokens={cfg.num_query_tokens}, vpg_width={cfg.vpg_width} (the projection P's input)")
        super().__init__(llm, cfg, tokenizer)
        self.vpg = vpg
        self.backends: tuple[str, str] | None = None  # (attention, adapter), resolved at the first forward
        # Mistral's sliding window: the backends are full causal, equal to the frozen model within the window only.
        self.sliding_window = getattr(llm.config, "sliding_window", None) if getattr(
            llm.config, "use_sliding_window", True) else None
        c = llm.config
        self.projection = nn.Linear(cfg.vpg_width, c.hidden_size, bias=False)
        nn.init.normal_(self.projection.weight, std=cfg.projection_init_std)
        n = c.num_hidden_layers
        self.blocks = nn.ModuleList(
            PILLBlock(cfg, c.hidden_size, c.num_attention_heads, is_last=(i == n - 1)) for i in range(n))
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
            raise ValueError("batch has pixel_values but the model was built without a VPG: give vpg_path, "
                             "or train on precomputed-feature shards (python -m shards.encode)")
        return self.vpg(pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, S) with a cache; 1 = real token
        modality_mask: torch.Tensor | None = None,  # (B, T) bool
        labels: torch.Tensor | None = None,  # (B, T), -100 = ignored
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W)
        image_features: torch.Tensor | None = None,  # (N, K, W)
        position_ids: torch.Tensor | None = None,  # (B, T)
        cu_seqlens: torch.Tensor | None = None,  # (n_docs + 1,) int32, packed batches (B == 1)
        max_seqlen: int | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = True,
        **unused,
    ) -> MethodOutput:
        """`num_items_in_batch`: answer tokens of the whole global batch; the loss is then this micro-batch's
        summed token loss divided by it (transformers' convention), so micro-batches and ranks weigh every answer
        token equally. `return_logits=False` (training) computes the LM head at answer positions only."""
        if self.backends is None:
            self.backends = resolve_backends(self.cfg, input_ids.device,
                                             zero3=hasattr(self.projection.weight, "ds_id"))
            for block in self.blocks:
                block.attn_backend, block.adapter_backend = self.backends
        attn_backend, adapter_backend = self.backends
        B, T = input_ids.shape
        if modality_mask is None:
            modality_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        modality_mask = modality_mask.bool()
        x = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)

        feats = self.encode_images(pixel_values, image_features)  # (N, K, W)
        if feats is not None:
            vis = self.projection(feats.to(self.projection.weight.dtype)).to(x.dtype).reshape(-1, x.shape[-1])
            torch._assert_async(modality_mask.sum() == vis.shape[0],
                                "modality_mask must mark exactly N_images * K visual tokens")
            x = x.masked_scatter(modality_mask.unsqueeze(-1), vis)
        elif torch.is_grad_enabled() and self.projection.weight.requires_grad:
            # No image in this micro-batch: P still takes part (on zero rows, a zero gradient), so every rank's
            # backward fires the same gradient hooks in the same order (ZeRO-2 reduces in that order).
            x = x + self.projection(x.new_zeros(0, self.cfg.vpg_width, dtype=self.projection.weight.dtype)).sum()

        past_len = past_key_values[0][0].shape[1] if past_key_values else 0
        if self.sliding_window is not None and past_len + T > self.sliding_window:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds the LLM's sliding_window="
                             f"{self.sliding_window}: PILL's attention is full causal and would differ from the frozen "
                             "model beyond it; keep sequences (data.max_length, prompt + generation) within it")
        cached = past_key_values is not None or use_cache
        if position_ids is None:
            if cached and attention_mask is not None:  # left padding in batched generation
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        if cu_seqlens is not None and max_seqlen is None and attn_backend == "triton":
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one sync per forward, not per layer
        mask = AttnMask(causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if cu_seqlens is not None:
            mask.doc_ids = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(T, device=x.device),
                                              right=True)[None].expand(B, T)
        if cached and attention_mask is not None:
            mask.key_padding = attention_mask.bool()
        # Without a cache, batches are right-padded: under a causal mask a real token never sees a pad (pads
        # come after it), so no padding mask is needed and every backend takes its unmasked fast path.
        position_embeddings = self.llm.model.rotary_emb(x, position_ids)

        schedules = RouteSchedules(modality_mask) if adapter_backend == "triton" else None
        new_cache, gates = [], []
        for i, (block, base) in enumerate(zip(self.blocks, self.llm.model.layers)):
            x, layer_cache, gate_abs = block(x, base, position_embeddings, modality_mask, mask,
                                             past_key_values[i] if past_key_values else None, schedules)
            new_cache.append(layer_cache)
            gates.append(gate_abs)
        h = self.llm.model.norm(x)
        logits = self.llm.lm_head(h) if return_logits or labels is None else None  # (B, T, V)
        loss = n_tokens = None
        if labels is not None:
            loss, n_tokens = causal_lm_loss(logits, labels, hidden=h, lm_head=self.llm.lm_head,
                                            num_items_in_batch=num_items_in_batch)
        return MethodOutput(loss=loss, logits=logits, kv_cache=new_cache if use_cache else None,
                            n_loss_tokens=n_tokens, gate_abs=torch.stack(gates) if gates[0] is not None else None)

def causal_lm_loss(logits: torch.Tensor | None, labels: torch.Tensor, *, hidden: torch.Tensor | None = None,
                   lm_head: nn.Module | None = None, num_items_in_batch: torch.Tensor | int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over positions whose label is not -100, and the number of those positions.

    Only the answer rows are upcast to fp32 (never the whole (B, T, V) logits); with `logits=None` the LM head
    runs on the answer rows of `hidden` alone. The loss is the token sum over `num_items_in_batch` when given
    (the global batch's answer tokens), else this batch's mean (0 when it has no answer token)."""
    targets = labels[:, 1:]
    keep = targets != -100  # (B, T-1)
    rows = logits[:, :-1][keep] if logits is not None else lm_head(hidden[:, :-1][keep])  # (n, V)
    total = F.cross_entropy(rows.float(), targets[keep], reduction="sum")
    n = keep.sum()
    denom = n.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / denom, n


def check_llm(config, source: str) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={getattr(config, 'model_type', None)!r} is not a Llama-architecture "
                         f"causal LM; PILL plugs into {SUPPORTED_MODEL_TYPES}")

