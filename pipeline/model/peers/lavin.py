"""LaVIN: Mixture-of-Modality Adaptation (MMA) of a frozen LLaMA and a frozen CLIP ViT-L/14.

Paper: Luo et al., "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models",
NeurIPS 2023 (arXiv 2305.15023); the authors' code, luogen1996/LaVIN at dd0a1bf (lavin/model.py, lavin/mm_adapter.py,
lavin/eval_model.py, lavin/generator.py, clip/model.py, util/datasets.py), wins where the paper is vague.

    visual tokens: the CLS state after CLIP blocks 4, 8, ..., 24 -> Linear(W, 128) - SiLU - Linear(128, D): 6 tokens
    modality token: Embedding(2, D)[has image], in front of every row, masked from every later token
    MMA adapter in front of the attention of every LLM layer and every CLIP block:
        MMA(X) = X + s * sum_k softmax((t W_r + b_r) / tau)_k * Up_k(Dropout_0.1(X W_A + b_A))
        t = the normed state of the row's first token (the modality token in the LLM, CLS in CLIP), two experts,
        rank 8, Up_k grouped 1x1 convolutions (groups = 2) with zero init, tau = 10, s = 1

As the authors compute it (docs/peers.md "Fidelity"):
- The modality token is masked from every later token (model.py:319-320 `mask[:, :, 1:, 0] = -inf`) and never
  cached (eval_model.py:136-138): it attends to itself alone, so at each layer its state is a function of "has an
  image" and it does nothing but route. It therefore runs beside the sequence (`_modality_step`, one token per
  row), not in it: the sequence is exactly the batch's tokens, and a text-only row at init IS the frozen LLM's.
- The visual MLP starts as the authors' AdapterMLP: xavier-uniform weights, zero biases (model.py:212-215); the
  adapters as RepAdapter_Router (xavier down-projection, zero up-projections and biases).
- s = 1: every published script passes --adapter_scale 1, so no scale field exists.
- Count-exact at 7B (3,781,296 = the paper's 3.78M): 32 LLM adapters (d = 4096) 81,930 each, 24 CLIP adapters
  (1024) 20,490 each, the visual MLP 659,584, the modality embedding 8,192. The code's "block" variant adds an
  adapter in front of each FFN too (`ffn_adapter: true`, not the published count).
Deliberate deviations:
- RoPE positions: the text starts at position 0 (the authors' at 1, behind the modality token; RoPE scores depend
  on position differences only). Decoding continues the training positions; the authors' generator gives each
  new token the position of the token before it (generator.py:93-101 with eval_model.py's cache slots: one
  less than in training), which cached decoding here does not copy: it equals the full forward (tested).
- CLIP-side routing: each image's adapters are routed on that image's CLS state. The authors' CLIP runs
  sequence-first (LND, clip/model.py:237), so their `x[:, 0]` (mm_adapter.py:46) routes token l of every image on
  token l of batch item 0: an artefact of the layout that makes an image's features depend on its batch
  neighbours. Per-image CLS routing is what the paper describes and what their code does for the LLM.
- Image normalisation: the data pipeline's (CLIP's mean/std, pipeline.constants), CLIP ViT-L/14's own. The
  authors normalise with ImageNet's (util/datasets.py:19); to run their released weights set data.image_mean:
  [0.485, 0.456, 0.406] and data.image_std: [0.229, 0.224, 0.225].
- The K = 6 placeholder positions per image ARE LaVIN's visual tokens ("Image: " + tokens comes from the prompt).
- CLIP carries trainable adapters, so LaVIN needs pixels (precomputed features only with `clip_adapters: false`).
- One training stage: stage 2 only. Attention through PILL's backends (eager / sdpa / triton).

Legend: B batch, T tokens, D width, N images, W CLIP width, r rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.attention import ATTENTION_BACKENDS, AttnBackend
from pipeline.model.base import MethodConfig, MethodOutput
from pipeline.model.batch import Batch
from pipeline.model.peers.common import VIT_L_LAYERS, PeerMethod, clip_peer_spec, modality, seq_context, take_cls_shape
from pipeline.model.seq import (
    LayerStep,
    PeerCache,
    SeqContext,
    expand_heads,
    extend,
    has_image,
    project_qkv,
    same_graph_on_every_rank,
    scatter_visual_tokens,
)


@dataclass
class LaVINConfig(MethodConfig):
    stage: int = 2
    """One-stage method: always 2."""
    rank: int = 8
    groups: int = 2
    """Groups of the up-projections' 1x1 convolutions."""
    temperature: float = 10.0
    """tau of the router softmax (7B)."""
    dropout: float = 0.1
    ffn_adapter: bool = False
    """Also an MMA adapter in front of each FFN (the code's 'block' variant; off in the published model)."""
    clip_adapters: bool = True
    """MMA adapters in front of every CLIP block's attention (needs pixels, not precomputed features)."""
    clip_layers: list[int] | None = None
    """1-based CLIP blocks whose CLS states are the visual tokens; None = 6 evenly spaced (4, 8, ..., 24)."""
    vision_width: int | None = None
    num_query_tokens: int | None = None
    """Visual tokens per image = len(clip_layers)."""
    projection_hidden: int = 128
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        self._check_common((2,))
        self._check(
            self.rank >= 1 and self.rank % self.groups == 0,
            "rank",
            f"must be a positive multiple of groups={self.groups}",
        )
        self._check(self.temperature > 0, "temperature", "must be > 0")
        self._check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")

    def take_front_end_shape(self, clip) -> None:
        take_cls_shape(self, clip, 6, "visual token")


class MMAdapter(nn.Module):
    """LaVIN's RepAdapter_Router: x + sum_k w_k Up_k(Dropout(Down x)), w = softmax(router(t) / tau)."""

    def __init__(self, dim: int, rank: int, groups: int, temperature: float, dropout: float):
        super().__init__()
        self.down = nn.Conv1d(dim, rank, 1, bias=True)
        self.up = nn.ModuleList(nn.Conv1d(rank, dim, 1, groups=groups, bias=True) for _ in range(2))
        self.router = nn.Linear(dim, 2)
        self.dropout = nn.Dropout(dropout)
        self.temperature = temperature
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def route(self, t: torch.Tensor) -> torch.Tensor:
        """(B, 2) expert weights from the routing state t (B, dim)."""
        return torch.softmax(self.router(t.to(self.router.weight.dtype)) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.down(x.to(self.down.weight.dtype).transpose(1, 2)))  # (B, r, T)
        delta = sum(weights[:, e, None, None] * up(z) for e, up in enumerate(self.up))  # (B, dim, T)
        return x + delta.transpose(1, 2).to(x.dtype)


class LaVIN(PeerMethod):
    method = "lavin"

    def __init__(self, llm: nn.Module, cfg: LaVINConfig, vpg=None, tokenizer=None):
        super().__init__(llm, cfg, vpg, tokenizer)
        c = llm.config
        mk = lambda dim: MMAdapter(dim, cfg.rank, cfg.groups, cfg.temperature, cfg.dropout)  # noqa: E731
        self.adapters = nn.ModuleList(mk(c.hidden_size) for _ in range(c.num_hidden_layers))
        self.ffn_adapters = (
            nn.ModuleList(mk(c.hidden_size) for _ in range(c.num_hidden_layers)) if cfg.ffn_adapter else None
        )
        n_clip = vpg.num_layers if vpg is not None else VIT_L_LAYERS
        self.clip_adapters = nn.ModuleList(mk(cfg.vision_width) for _ in range(n_clip)) if cfg.clip_adapters else None
        # the visual MLP: projection (W -> 128), then projection_out (SiLU, 128 -> D)
        self.projection = nn.Linear(cfg.vision_width, cfg.projection_hidden)
        self.projection_out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.projection_hidden, c.hidden_size))
        for lin in (self.projection, self.projection_out[1]):  # the authors' AdapterMLP init (model.py:212-215)
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.modality_embedding = nn.Embedding(2, c.hidden_size)
        self.steps = nn.ModuleList(LayerStep(self._layer) for _ in range(c.num_hidden_layers))
        self.freeze()

    def is_trainable(self, name: str, stage: int) -> bool:
        return name.startswith(
            ("adapters.", "ffn_adapters.", "clip_adapters.", "projection.", "projection_out.", "modality_embedding.")
        )

    # ---- forward -------------------------------------------------------------------------------------------------
    def visual_tokens(self, pixel_values, image_features) -> torch.Tensor | None:
        """(N, K, D) projected CLS states, or None when the batch has no image."""
        if image_features is not None and image_features.numel():
            if self.clip_adapters is not None:
                raise ValueError(
                    "LaVIN adapts CLIP's blocks (clip_adapters: true), so precomputed image_features "
                    "cannot be used: train on pixel shards, or set clip_adapters: false"
                )
            feats = image_features
        elif (pixel_values is not None and pixel_values.numel()) or (
            same_graph_on_every_rank() and self.vpg is not None
        ):
            if pixel_values is None or pixel_values.numel() == 0:
                # One blank image that no position receives (CLIP cannot run on zero images): the same graph on
                # every rank (common.py), zero gradients.
                s = self.vpg.image_size
                pixel_values = self.projection.weight.new_zeros(1, 3, s, s)
            if self.vpg is None:
                raise ValueError(
                    "batch has pixel_values but LaVIN was built without a CLIP front end: give "
                    "model.vpg_path (a CLIP dir or 'tiny')"
                )
            adapter = None
            if self.clip_adapters is not None:

                def adapter(i, a):
                    return self.clip_adapters[i](a, self.clip_adapters[i].route(a[:, 0]))

            feats = self.vpg.cls_features(pixel_values, self.cfg.clip_layers, adapter)  # (N, K, W)
        elif same_graph_on_every_rank():
            feats = self.projection.weight.new_zeros(0, len(self.cfg.clip_layers), self.cfg.vision_width)
        else:
            return None
        return self.projection_out(self.projection(feats.to(self.projection.weight.dtype)))

    def adapted(self, batch: Batch, cache: PeerCache | None, use_cache: bool) -> MethodOutput:
        """Hidden states at the batch's positions (the modality token is not one of them)."""
        if batch.cu_seqlens is not None:
            raise ValueError(
                "LaVIN routes every row on its own modality token: packed batches (data.pack) are not supported"
            )
        mm = modality(batch)
        x = self.llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        vis = self.visual_tokens(batch.pixel_values, batch.image_features)
        if vis is not None and bool(mm.any()):
            x = scatter_visual_tokens(x, mm, vis)
        elif vis is not None:  # the blank image of a batch without images: scattered nowhere
            x = x.masked_scatter(mm.unsqueeze(-1), vis.to(x.dtype))
        # The modality token runs beside the sequence, not in it: no later token attends to it (the authors' mask),
        # so it only routes; its routing weights are fixed at the prompt and kept in the cache.
        tok = None if cache is not None else self.modality_embedding(has_image(mm).long()).to(x.dtype)[:, None]
        ctx = seq_context(self.llm, x, batch, cache, use_cache, packed=False)
        routes = cache.extra["routes"] if cache is not None else []
        new_layers = []
        for i, base in enumerate(self.llm.model.layers):
            past = cache.layers[i] if cache is not None else None
            x, tok, kv, w = self.steps[i](i, base, x, tok, ctx, routes[i] if cache is not None else None, past)
            new_layers.append(kv)
            if cache is None:
                routes.append(w)
        return self.output(x, ctx, new_layers, {"routes": routes}, use_cache)

    def _modality_step(self, i: int, base: nn.Module, tok: torch.Tensor):
        """The modality token (B, 1, D) through layer i on its own, and its routing weights ((B, 2), (B, 2) | None).

        It attends to itself alone (the authors' causal mask gives position 0 one key), so its attention output is
        its own value row, whatever RoPE does to its query and key."""
        attn = base.self_attn
        t_n = base.input_layernorm(tok)
        w = self.adapters[i].route(t_n[:, 0])
        v = attn.v_proj(self.adapters[i](t_n, w)).unflatten(-1, (-1, attn.head_dim))  # (B, 1, Hkv, Dh)
        h = tok + attn.o_proj(expand_heads(v, self.llm.config.num_attention_heads).flatten(2))
        f = base.post_attention_layernorm(h)
        w_ffn = None
        if self.ffn_adapters is not None:
            w_ffn = self.ffn_adapters[i].route(f[:, 0])
            f = self.ffn_adapters[i](f, w_ffn)
        return h + base.mlp(f), (w, w_ffn)

    def _layer(self, i: int, base: nn.Module, x, tok, ctx: SeqContext, routes, cache):
        """Layer i on the sequence x (B, T, D), routed by the modality token `tok` (prompt) or by the cached
        `routes` (decoding): (x, tok, (k, v), routes)."""
        if routes is None:
            tok, routes = self._modality_step(i, base, tok)
        w, w_ffn = routes
        attn = base.self_attn
        B, T, _ = x.shape
        a = self.adapters[i](base.input_layernorm(x), w)
        q, k, v = project_qkv(attn, a, ctx.position_embeddings)
        k, v = extend(cache and cache[0], k), extend(cache and cache[1], v)
        o = ATTENTION_BACKENDS[self.backend](q, k, v, None, ctx.mask, attn.scaling)
        h = x + attn.o_proj(o.reshape(B, T, -1))
        f = base.post_attention_layernorm(h)
        if self.ffn_adapters is not None:
            f = self.ffn_adapters[i](f, w_ffn)
        return h + base.mlp(f), tok, (k, v), routes


SPEC = clip_peer_spec(
    LaVIN,
    LaVINConfig,
    published="paper: 3.78M at 7B (exact)",
    stages=(2,),
)
