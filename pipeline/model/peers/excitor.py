"""LLaMA-Excitor: instruction tuning through indirect feature interaction, reconstructed from the paper's equations.

Paper: Zou et al., "LLaMA-Excitor: General Instruction Tuning via Indirect Feature Interaction", CVPR 2024
(arXiv 2404.00913, seed 002_*). There is no public code; this follows PEERS_SPEC.md's card.

    top L layers (L = 30): prompts P_l (K x D, K = 30), a low-rank query map W_q^Ex (D -> r -> D, r = 16),
    a scalar gate g_l
    Key_ex = softmax(W_q^Ex(T) P_l^T / sqrt(D)) P_l                      (M x D, one row per token)
    scores = Q K^T / sqrt(Dh) + g_l * Q Key_ex^T / sqrt(Dh) + causal   (per head; Key_ex split into heads)
    O      = softmax(scores) V                                        (ONE softmax, the values untouched)
    image: CLIP patch features F_v through W_k^Ex, W_v^Ex: keys [P_l ; W_k^Ex F_v], values [W_v^Ex F_v ; P_l]

The invariant the paper states, and a test: the excitor only re-weights, so every output row of the attention is
still a convex combination of the original value rows.

Assumptions (the paper does not say; each is a choice made here):
 1. g_l is zero-initialised and used raw (no tanh): at step 0 the model is the frozen LLM, text or image.
 2. T is the layer's RMS-normed input (what Q reads); Key_ex has no RoPE and does not pass through W_k.
 3. The inner softmax is scaled by 1/sqrt(D) (standard dot-product attention; unscaled logits of N(0, 1)
    prompts at D = 4096 would be one-hot).
 4. W_q^Ex = Up(Down(T)), both nn.Linear default init, no bias; P_l ~ N(0, 1) as LLaMA-Adapter's prompts.
 5. W_k^Ex, W_v^Ex (CLIP width -> D, no bias) are shared by all adapted layers (one pair per layer would be
    252M at 7B, far above the paper's budget); the multimodal count (16,007,198 at 7B) is therefore a reconstruction,
    the text-only one (7,618,590 = 30 x (30 x 4096 + 2 x 16 x 4096 + 1), "about 7.6M") follows the card.
 6. The key/value concatenation is taken literally from the card: keys [P_l ; W_k F_v], values [W_v F_v ; P_l],
    row i of one paired with row i of the other. Rows without an image use keys = values = P_l.
 7. F_v = the patch states (CLS dropped) after CLIP's penultimate block (LLaVA's convention), at most one image
    per row; no visual token enters the sequence. The batch's K placeholder positions per image are hidden from
    attention and do not advance RoPE (pipeline.model.peers.common); with precomputed features K must equal the
    number of patch rows (the collator checks it), with pixels any K works (default 1).
 8. Key_ex of past tokens is cached for decoding next to k and v.
 9. One training stage (stage 2 only).
Attention: Excitor changes the scores, so it has its own eager path (materialised scores, fp32 softmax) and an
sdpa path (the excitor term as an additive float mask); PILL's Triton kernel does not apply.

Legend: B batch, T new tokens, S cached + new, D width, H heads, Dh head width, K prompts, Np patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import ATTENTION_BACKENDS, ATTN_BACKEND_CHOICES, AttnMask, dense_mask
from pipeline.model.base import MethodConfig, MethodOutput, literal_values
from pipeline.model.batch import Batch
from pipeline.model.peers.common import VIT_L_WIDTH, PeerMethod, clip_peer_spec, modality, seq_context
from pipeline.model.seq import (
    LayerStep,
    PeerCache,
    SeqContext,
    expand_heads,
    extend,
    front_end_features,
    image_rows,
    project_qkv,
)

# Its attention needs the materialised scores (the excitation rescales them): no fused kernel.
ExcitorBackend = Literal[tuple(b for b in ATTN_BACKEND_CHOICES if b != "triton")]


@dataclass
class ExcitorConfig(MethodConfig):
    stage: int = 2
    adapter_layers: int = 30
    prompt_len: int = 30
    rank: int = 16
    """Bottleneck of the low-rank query map W_q^Ex."""
    prompt_init_std: float = 1.0
    multimodal: bool = True
    vision_layer: int = -2
    """CLIP block whose patch states are F_v (negative: from the end)."""
    vision_width: int | None = None
    num_query_tokens: int = 1
    """Placeholder positions per image (hidden from attention); = patch rows with precomputed features."""
    attn_backend: ExcitorBackend = "eager"
    """eager | sdpa (auto = sdpa); the excitor scores have no Triton kernel."""

    def __post_init__(self) -> None:
        self._check_common((2,), literal_values(ExcitorBackend))
        for f in ("adapter_layers", "prompt_len", "rank"):
            self._check(getattr(self, f) >= 1, f, "must be >= 1")

    def take_front_end_shape(self, clip) -> None:
        if self.vision_width is None:
            self.vision_width = clip.width if clip is not None else VIT_L_WIDTH


def excitor_attention(q, k, v, key_ex, gate, mask: AttnMask, scale: float, backend: str = "eager"):
    """softmax(q k^T s + gate q key_ex^T s + mask) v.  q, key_ex: (B, Tq|Tk, H, Dh); k, v: (B, Tk, Hkv, Dh)."""
    H = q.shape[2]
    q, key_ex = q.transpose(1, 2), key_ex.transpose(1, 2)  # (B, H, T, Dh)
    k, v = expand_heads(k, H).transpose(1, 2), expand_heads(v, H).transpose(1, 2)
    Tq, Tk = q.shape[2], k.shape[2]
    bias = torch.matmul(q, key_ex.transpose(-2, -1)).float() * (scale * gate.float())  # (B, H, Tq, Tk)
    allowed = dense_mask(mask, Tq, Tk, q.device)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale + bias
        o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return o.transpose(1, 2)  # (B, Tq, H, Dh)


def _check_head_split(c) -> None:
    """Key_ex lives in the model width (the prompts are D wide) and is split into the query heads, which needs
    heads x head_dim == D: true of Llama and Mistral, not of every Qwen3 (the paper defines nothing else)."""
    heads, head_dim = c.num_attention_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if heads * head_dim != c.hidden_size:
        raise ValueError(
            f"excitor: {type(c).__name__} has {heads} heads x head_dim {head_dim} = {heads * head_dim} != "
            f"hidden_size {c.hidden_size}; Excitor's Key_ex (width hidden_size) cannot be split into its heads"
        )


class Excitor(PeerMethod):
    method = "excitor"

    def __init__(self, llm: nn.Module, cfg: ExcitorConfig, vpg=None, tokenizer=None):
        super().__init__(llm, cfg, vpg, tokenizer)
        _check_head_split(llm.config)
        c = llm.config
        d, n = c.hidden_size, c.num_hidden_layers
        self.n_adapted = min(cfg.adapter_layers, n)
        self.first_adapted = n - self.n_adapted
        self.prompts = nn.Embedding(self.n_adapted * cfg.prompt_len, d)
        nn.init.normal_(self.prompts.weight, std=cfg.prompt_init_std)
        self.query_down = nn.ModuleList(nn.Linear(d, cfg.rank, bias=False) for _ in range(self.n_adapted))
        self.query_up = nn.ModuleList(nn.Linear(cfg.rank, d, bias=False) for _ in range(self.n_adapted))
        self.gates = nn.Parameter(torch.zeros(self.n_adapted))
        self.projection = None
        if cfg.multimodal:  # [W_k^Ex; W_v^Ex] fused in one Linear (assumption 5: shared by the layers)
            self.projection = nn.Linear(cfg.vision_width, 2 * d, bias=False)
        self.backend = "sdpa" if cfg.attn_backend == "auto" else cfg.attn_backend
        self.steps = nn.ModuleList(LayerStep(self._layer) for _ in range(n))
        self.freeze()

    def is_trainable(self, name: str, stage: int) -> bool:
        return name.startswith(("prompts.", "query_down.", "query_up.", "projection.")) or name == "gates"

    # ---- forward -------------------------------------------------------------------------------------------------
    def visual_kv(self, mm, pixel_values, image_features, B: int):
        """(vk, vv, has_img): (B, Np, D) W_k^Ex F_v and W_v^Ex F_v per row (zeros where no image), or None."""
        if self.projection is None:
            return None
        feats = front_end_features(
            self,
            pixel_values,
            image_features,
            lambda px: self.vpg.patch_features(px, self.cfg.vision_layer),  # (N, Np, W)
            (1, self.cfg.vision_width),
            "patch",
        )  # zero rows: no row sees them
        if feats is None:
            return None
        rows = image_rows(mm, self.cfg.num_query_tokens)
        if rows.numel() != torch.unique(rows).numel():
            raise ValueError("Excitor takes at most one image per row (its excitor keys hold one image's patches)")
        kv = self.projection(feats.to(self.projection.weight.dtype))  # (N, Np, 2D)
        vk = kv.new_zeros(B, kv.shape[1], kv.shape[2] // 2)
        vv = vk.clone()
        vk[rows], vv[rows] = kv.chunk(2, dim=-1)
        has = torch.zeros(B, dtype=torch.bool, device=kv.device)
        has[rows] = True
        return vk, vv, has

    def adapted(self, batch: Batch, cache: PeerCache | None, use_cache: bool) -> MethodOutput:
        """The image only through the excitor keys (its placeholders hidden)."""
        mm = modality(batch)
        x = self.llm.get_input_embeddings()(batch.input_ids)
        if cache is not None:
            vis = cache.extra["visual"]
        else:
            vis = self.visual_kv(mm, batch.pixel_values, batch.image_features, batch.rows)
        ctx = seq_context(self.llm, x, batch, cache, use_cache, hide=mm)
        x, layers = self.run_layers(x, ctx, vis, cache)
        gates = self.layer_gate_abs(self.first_adapted, self.gates.detach().abs())
        return self.output(x, ctx, layers, {"visual": vis}, use_cache, gate_abs=gates)

    def _layer(self, i: int, base: nn.Module, x, ctx: SeqContext, vis, cache):
        attn = base.self_attn
        B, T, D = x.shape
        x_n = base.input_layernorm(x)
        q, k, v = project_qkv(attn, x_n, ctx.position_embeddings)
        k, v = extend(cache and cache[0], k), extend(cache and cache[1], v)
        j = i - self.first_adapted
        if j < 0:  # a layer the method leaves alone
            key_ex = None
            o = ATTENTION_BACKENDS[self.backend](q, k, v, None, ctx.mask, attn.scaling)
        else:
            key_ex = self.excitor_keys(j, x_n, vis).view(B, T, -1, attn.head_dim).to(q.dtype)  # (B, T, H, Dh)
            key_ex = extend(cache and cache[2], key_ex)
            o = excitor_attention(q, k, v, key_ex, self.gates[j], ctx.mask, attn.scaling, self.backend)
        h = x + attn.o_proj(o.reshape(B, T, -1))
        return h + base.mlp(base.post_attention_layernorm(h)), (k, v, key_ex)

    def excitor_keys(self, j: int, x_n: torch.Tensor, vis) -> torch.Tensor:
        """Key_ex (B, T, D) = softmax(W_q^Ex(T) keys^T / sqrt(D)) values for adapted layer j."""
        L = self.cfg.prompt_len
        p = self.prompts.weight[j * L : (j + 1) * L]  # (K, D)
        t = x_n.to(p.dtype)
        qx = self.query_up[j](self.query_down[j](t))  # (B, T, D)
        B, D = t.shape[0], t.shape[-1]
        if vis is None:
            keys = vals = p[None].expand(B, -1, -1)
            allowed = None
        else:
            vk, vv, has = vis
            keys = torch.cat([p[None].expand(B, -1, -1), vk], dim=1)  # [P ; W_k F_v]  (B, K + Np, D)
            img_vals = torch.cat([vv, p[None].expand(B, -1, -1)], dim=1)  # [W_v F_v ; P]
            txt_vals = torch.cat([p[None].expand(B, -1, -1), torch.zeros_like(vv)], dim=1)
            vals = torch.where(has[:, None, None], img_vals, txt_vals)
            cols = torch.arange(keys.shape[1], device=p.device)
            allowed = has[:, None] | (cols[None] < L)  # (B, K + Np): text rows see the prompts only
        logits = torch.einsum("btd,bkd->btk", qx, keys).float() / math.sqrt(D)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.einsum("btk,bkd->btd", torch.softmax(logits, dim=-1).to(vals.dtype), vals)


SPEC = clip_peer_spec(
    Excitor,
    ExcitorConfig,
    published="paper: about 7.6M text-only (7,618,590: multimodal=false); the multimodal W_k/W_v are a reconstruction",
    stages=(2,),
)
