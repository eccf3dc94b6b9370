"""IAA: the Inner-Adaptor Architecture, a frozen LLM with full trainable decoder layers on a separate image path.

Paper: Wang et al., "IAA: Inner-Adaptor Architecture Empowers Frozen Large Language Model with Multimodal
Capabilities", arXiv 2408.12902 (seed 003_*); PEERS_SPEC.md's card (code read) wins where the paper is vague.

    image path (rows with an image):
        x   = MM-EL(ids) with the projected CLIP patch features spliced at the <image> positions
        for each frozen layer F_i:  x = F_i(x);  if i in S: x = A_j(x)      (serial, no gate)
        out = MM-LH(MM-norm(x))
    text path (rows without an image): the untouched frozen LLM, so its NLP behaviour is preserved exactly
    S (IAA-14) = {0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31} of 32 layers

Design choices (reconstructions are marked R):
- A_j: a transformers decoder layer of the LLM's own class, initialised as a copy of the frozen layer it follows
  (R: "likely", unverified). MM-EL, the MM final norm and MM-LH start as copies of the frozen embedding, norm and
  LM head. Copies are made from gathered weights when the LLM is ZeRO-3 partitioned.
- R: on another depth, S is the same pattern: layers i with i % 5 in {0, 1}, plus the last two. `insert_after`
  sets S explicitly (IAA-8's set is not published).
- The projector is LLaVA's mlp2x_gelu: Linear(W, D) - GELU - Linear(D, D); the visual tokens are CLIP's patch
  states (CLS dropped) after the penultimate block, K = number of patches (256 for ViT-L/14 at 224 px): the
  batch's K placeholder positions per image are the visual tokens.
- Two stages (as the paper): stage 1 trains the projector alone (the adaptors keep their copied weights);
  stage 2 trains the projector, the adaptors, MM-EL and MM-LH (+ its norm).
- Each row takes one path, decided by whether its prompt has an image (kept in the KV cache for decoding). A
  batch is split by rows, each half runs its own stack; the loss is the sum over both halves over the batch's
  answer tokens. Packed batches (data.pack) would mix paths in one row and are rejected.
- Count: IAA-14 at Llama-3-8B is 4,125,224,960 trainable (14 x 218.1M layers + 2 x 525.3M embedding/head +
  21.0M projector; the card's "about 4.1B"). That much needs ZeRO-3 or ZeRO-2 with optimizer offload
  (`python -m pipeline.params --memory`); the preset uses ZeRO-3.

Legend: B batch, T tokens, D width, N images, K visual tokens per image, W CLIP width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.attention import AttnBackend
from pipeline.model.base import MethodConfig, MethodOutput
from pipeline.model.batch import Batch
from pipeline.model.peers.common import VIT_L_PATCHES, VIT_L_WIDTH, PeerMethod, clip_peer_spec, modality, seq_context
from pipeline.model.seq import (
    LayerStep,
    PeerCache,
    front_end_features,
    frozen_layer,
    has_image,
    same_graph_on_every_rank,
    scatter_visual_tokens,
)

_ROW_FIELDS = ("input_ids", "attention_mask", "labels", "position_ids", "source")
"""Batch fields with one row per sequence: split between the two paths."""
_STAGE_MODULES = {
    1: ("projection.", "projection_out."),
    2: ("projection.", "projection_out.", "adaptors.", "mm_embed.", "mm_norm.", "mm_head."),
}


def iaa_layers(n_layers: int) -> list[int]:
    """IAA-14's insertion pattern on an n-layer LLM (exactly IAA-14's set for 32 layers)."""
    return sorted({i for i in range(n_layers) if i % 5 in (0, 1)} | {max(n_layers - 2, 0), n_layers - 1})


@dataclass
class IAAConfig(MethodConfig):
    stage: int = 2
    """1 = projector pre-training; 2 = projector + inner adaptors + MM-EL + MM-LH."""
    insert_after: list[int] | None = None
    """0-based frozen layers followed by an inner adaptor; None = IAA-14's pattern (iaa_layers)."""
    vision_layer: int = -2
    vision_width: int | None = None
    num_query_tokens: int | None = None
    """Visual tokens per image = CLIP patches (from the front end; 256 without one)."""
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        self._check_common((1, 2))

    def take_front_end_shape(self, clip) -> None:
        if self.vision_width is None:
            self.vision_width = clip.width if clip is not None else VIT_L_WIDTH
        if self.num_query_tokens is None:
            self.num_query_tokens = clip.num_patches if clip is not None else VIT_L_PATCHES
        if clip is not None:
            self._check(
                self.num_query_tokens == clip.num_patches,
                "num_query_tokens",
                f"must equal the CLIP front end's {clip.num_patches} patches (one visual token each)",
            )


class IAA(PeerMethod):
    method = "iaa"

    def __init__(self, llm: nn.Module, cfg: IAAConfig, vpg=None, tokenizer=None):
        super().__init__(llm, cfg, vpg, tokenizer)
        c = llm.config
        n = c.num_hidden_layers
        self.insert_after = sorted(cfg.insert_after) if cfg.insert_after is not None else iaa_layers(n)
        if any(not 0 <= i < n for i in self.insert_after) or len(set(self.insert_after)) != len(self.insert_after):
            raise ValueError(f"IAAConfig.insert_after={cfg.insert_after}: distinct layer indices in 0..{n - 1}")
        layers = llm.model.layers
        self.adaptors = nn.ModuleList(
            _copy(layers[i], lambda b=layers[i]: type(b)(c, b.self_attn.layer_idx)) for i in self.insert_after
        )
        emb = llm.get_input_embeddings()
        self.mm_embed = _copy(emb, lambda: nn.Embedding(emb.num_embeddings, emb.embedding_dim))
        self.mm_norm = _copy(llm.model.norm, lambda: type(llm.model.norm)(c.hidden_size, eps=c.rms_norm_eps))
        self.mm_head = _copy(llm.lm_head, lambda: nn.Linear(c.hidden_size, c.vocab_size, bias=False))
        # LLaVA's mlp2x_gelu: projection (W -> D), then projection_out (GELU, D -> D)
        self.projection = nn.Linear(cfg.vision_width, c.hidden_size)
        self.projection_out = nn.Sequential(nn.GELU(), nn.Linear(c.hidden_size, c.hidden_size))
        self._adaptor_of = {layer: j for j, layer in enumerate(self.insert_after)}
        self.steps = nn.ModuleList(LayerStep(frozen_layer) for _ in range(n + len(self.insert_after)))
        self.freeze()

    def is_trainable(self, name: str, stage: int) -> bool:
        return name.startswith(_STAGE_MODULES[stage])

    def set_stage(self, stage: int) -> None:
        if stage not in (1, 2):
            raise ValueError(f"IAA: stage must be 1 or 2, got {stage!r}")
        super().set_stage(stage)

    # ---- forward -------------------------------------------------------------------------------------------------
    def visual_tokens(self, pixel_values, image_features) -> torch.Tensor | None:
        feats = front_end_features(
            self,
            pixel_values,
            image_features,
            lambda px: self.vpg.patch_features(px, self.cfg.vision_layer),  # (N, K, W)
            (self.cfg.num_query_tokens, self.cfg.vision_width),
            "patch",
        )
        if feats is None:
            return None
        return self.projection_out(self.projection(feats.to(self.projection.weight.dtype)))  # (N, K, D)

    def adapted(self, batch: Batch, cache: PeerCache | None, use_cache: bool) -> MethodOutput:
        """Hidden states (B, T, D), each row from its path's norm, and `head_index` (B,): 1 for the rows that took
        the image path (their logits come from MM-LH, `logits`)."""
        if batch.cu_seqlens is not None:
            raise ValueError("IAA sends each row down one path (image or text): packed batches are not supported")
        mm = modality(batch)
        mm_rows = cache.extra["mm_rows"] if cache is not None else has_image(mm)
        vis = self.visual_tokens(batch.pixel_values, batch.image_features) if cache is None else None
        hidden, paths = None, {}
        for path, rows in (("text", ~mm_rows), ("mm", mm_rows)):
            idx = rows.nonzero().squeeze(1)
            if idx.numel() == 0 and not (path == "mm" and same_graph_on_every_rank() and cache is None):
                continue  # (training runs the image path on zero rows: the same graph on every rank, seq.py)
            sub = batch.replace(
                **{f: None if getattr(batch, f) is None else getattr(batch, f)[idx] for f in _ROW_FIELDS},
                modality_mask=mm[idx],
            )
            past = cache.extra["paths"][path] if cache is not None else None
            h, paths[path] = self._run(path, sub, vis, past, use_cache)
            if hidden is None:
                hidden = h.new_zeros(batch.rows, *h.shape[1:])
            hidden = hidden.to(torch.promote_types(hidden.dtype, h.dtype))  # MM-norm's fp32 next to a bf16 LLM
            hidden[idx] = h.to(hidden.dtype)
        kv = PeerCache([], torch.ones(batch.rows, 0, dtype=torch.bool), {"mm_rows": mm_rows, "paths": paths})
        return MethodOutput(hidden=hidden, head_index=mm_rows.long(), kv_cache=kv if use_cache else None)

    def logits(self, hidden: torch.Tensor, head_index: torch.Tensor | None = None) -> torch.Tensor:
        """(..., V): the frozen LM head where head_index is 0 (or None), MM-LH where it is 1. MM-LH runs (on zero
        rows if need be) whenever training, so every rank's graph holds the same parameters (seq.py)."""
        head = self.llm.lm_head
        if head_index is None:
            return head(hidden.to(head.weight.dtype))
        mm = head_index.bool()
        parts = {}
        for on, h in ((False, head), (True, self.mm_head)):
            sel = mm == on
            if not on or bool(sel.any()) or same_graph_on_every_rank():
                parts[on] = (sel, h(hidden[sel].to(h.weight.dtype)))
        dtype = torch.promote_types(*(p.dtype for _, p in parts.values())) if len(parts) > 1 else None
        first = next(iter(parts.values()))[1]
        out = first.new_zeros(*hidden.shape[:-1], first.shape[-1], dtype=dtype or first.dtype)
        for sel, p in parts.values():
            out[sel] = p.to(out.dtype)
        return out

    def _run(self, path: str, batch: Batch, vis, cache: PeerCache | None, use_cache: bool):
        """One path's stack on its rows: (final-normed hidden states, cache)."""
        image = path == "mm"
        frozen_dtype = self.llm.get_input_embeddings().weight.dtype  # the frozen layers' dtype
        x = (self.mm_embed if image else self.llm.get_input_embeddings())(batch.input_ids).to(frozen_dtype)
        if image and vis is not None:
            x = scatter_visual_tokens(x, batch.modality_mask, vis)
        ctx = seq_context(self.llm, x, batch, cache, use_cache, packed=False)
        new_layers = []
        for i, base in enumerate(self.llm.model.layers):
            past = cache.layers[len(new_layers)] if cache is not None else None
            x, kv = self.steps[len(new_layers)](base, x, ctx, self.backend, past)
            new_layers.append(kv)
            if image and i in self._adaptor_of:
                past = cache.layers[len(new_layers)] if cache is not None else None
                adaptor = self.adaptors[self._adaptor_of[i]]
                y, kv = self.steps[len(new_layers)](
                    adaptor, x.to(adaptor.input_layernorm.weight.dtype), ctx, self.backend, past
                )
                x = y.to(x.dtype)
                new_layers.append(kv)
        norm = self.mm_norm if image else self.llm.model.norm
        return norm(x.to(norm.weight.dtype)), PeerCache(new_layers, ctx.key_mask) if use_cache else None


def _copy(src: nn.Module, make) -> nn.Module:
    """A fresh trainable module (from `make()`) holding src's weights, gathered first if ZeRO-3 partitioned them."""
    dst = make()
    params = list(src.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # ZeRO-3 only: the model package does not otherwise need DeepSpeed

        with deepspeed.zero.GatheredParameters(params):
            dst.load_state_dict(src.state_dict())
    else:
        dst.load_state_dict(src.state_dict())
    return dst.float()


SPEC = clip_peer_spec(
    IAA,
    IAAConfig,
    published="paper: about 4.1B at Llama-3-8B for IAA-14 (--llm-preset llama3-8b), about 2.8B for IAA-8",
    stages=(1, 2),
)
