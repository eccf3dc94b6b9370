"""LLaMA-Adapter (V1, with its multimodal ScienceQA variant) on a frozen transformers Llama.

Paper: Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
arXiv 2303.16199 (seed 004_*); PEERS_SPEC.md's card (read from the authors' code) wins where the paper is vague.

    top L layers (L = 30 of 32): K learnable adaption prompts P_l (K x D), one embedding table, init N(0, 1)
    image: M CLS states of the frozen CLIP (multi-scale global feature) -> MLP -> I_p (1 x D), added to every
            prompt of every adapted layer: P_l + repeat_K(I_p)
    per head h:  O = softmax(Q K_t^T / sqrt(Dh) + causal) V_t  +  tanh(g_{l,h}) softmax(Q K_p^T / sqrt(Dh)) V_p
            K_p, V_p = W_k P, W_v P on the RAW prompt (no RMSNorm, no RoPE); every query sees every prompt
    g: one scalar per head per layer, zero init -> at step 0 the model IS the frozen LLM (text or image)

Design choices (reconstructions are marked R):
- The first term goes through the same attention backends as PILL (eager / sdpa / triton); the prompt term is a
  second, separate softmax over only K keys, computed in PyTorch (materialising (B, H, T, K) is cheap).
- R: the multi-scale global feature is the CLS state after `clip_layers` (default: 3 evenly spaced blocks
  ending at the last, 8/16/24 of ViT-L), concatenated (M*W) -> Linear(M*W, r) - SiLU - Linear(r, D), r = 64. The
  paper gives neither M nor the MLP; this one has 0.46M parameters, so the 7B total is 1.69M against the
  paper's "1.8M". The text-only count 1,229,760 (30 x 10 x 4096 + 30 x 32) is exact.
- Placeholders: the image does not enter the sequence. The batch's K = M placeholder positions per image (so a
  precomputed feature row per scale: shards.encode's CLS features) are hidden from attention and do not advance
  RoPE positions (pipeline.model.peers.common); they only say which row the image belongs to. A row with several
  images adds their I_p.
- One training stage (the method has no alignment stage): stage 2 only.
- On a model shallower than `adapter_layers`, every layer is adapted.
- The prompts' K/V are recomputed at each decoding step (K tokens through W_k, W_v), not cached.

Legend: B batch, T tokens, D width, H heads, Hkv kv heads, Dh head width, K prompt length, M CLS scales, N images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import ATTENTION_BACKENDS, AttnBackend
from pipeline.model.base import MethodConfig, MethodOutput
from pipeline.model.batch import Batch
from pipeline.model.peers.common import PeerMethod, clip_peer_spec, modality, seq_context, take_cls_shape
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


@dataclass
class LlamaAdapterConfig(MethodConfig):
    stage: int = 2
    """One-stage method: always 2."""
    adapter_layers: int = 30
    """Adapt the top L layers (all of them on a shallower model)."""
    prompt_len: int = 10
    """K adaption prompts per adapted layer."""
    prompt_init_std: float = 1.0
    """The code's nn.Embedding default, N(0, 1)."""
    multimodal: bool = True
    """False: text-only LLaMA-Adapter (no image MLP)."""
    clip_layers: list[int] | None = None
    """1-based CLIP blocks whose CLS states form the multi-scale global feature; None = 3 evenly spaced."""
    vision_width: int | None = None
    """CLIP width; None = the front end's (1024 without one)."""
    num_query_tokens: int | None = None
    """Placeholder positions per image = len(clip_layers) (set from them; a different value is an error)."""
    projection_hidden: int = 64
    """Bottleneck of the image MLP (a reconstruction, see the module docstring)."""
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        self._check_common((2,))
        self._check(self.adapter_layers >= 1, "adapter_layers", "must be >= 1")
        self._check(self.prompt_len >= 1, "prompt_len", "must be >= 1")
        self._check(self.projection_hidden >= 1, "projection_hidden", "must be >= 1")

    def take_front_end_shape(self, clip) -> None:
        take_cls_shape(self, clip, 3, "feature row")


class LlamaAdapter(PeerMethod):
    method = "llama_adapter"

    def __init__(self, llm: nn.Module, cfg: LlamaAdapterConfig, vpg=None, tokenizer=None):
        super().__init__(llm, cfg, vpg, tokenizer)
        c = llm.config
        n = c.num_hidden_layers
        self.n_adapted = min(cfg.adapter_layers, n)
        self.first_adapted = n - self.n_adapted
        self.prompts = nn.Embedding(self.n_adapted * cfg.prompt_len, c.hidden_size)
        nn.init.normal_(self.prompts.weight, std=cfg.prompt_init_std)
        self.gates = nn.Parameter(torch.zeros(self.n_adapted, c.num_attention_heads))
        self.projection = self.projection_out = None
        if cfg.multimodal:  # the image MLP: projection (down, M*W -> r), then projection_out (SiLU, r -> D)
            self.projection = nn.Linear(len(cfg.clip_layers) * cfg.vision_width, cfg.projection_hidden)
            self.projection_out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.projection_hidden, c.hidden_size))
        self.steps = nn.ModuleList(LayerStep(self._layer) for _ in range(c.num_hidden_layers))
        self.freeze()

    def is_trainable(self, name: str, stage: int) -> bool:
        return name.startswith(("prompts.", "projection.", "projection_out.")) or name == "gates"

    # ---- forward -------------------------------------------------------------------------------------------------
    def image_prompt(self, modality_mask: torch.Tensor, pixel_values, image_features, B: int) -> torch.Tensor | None:
        """(B, D) the summed I_p of each row's images, or None when the batch has no image."""
        if self.projection is None:
            return None
        feats = front_end_features(
            self,
            pixel_values,
            image_features,
            lambda px: self.vpg.cls_features(px, self.cfg.clip_layers),  # (N, M, W)
            (len(self.cfg.clip_layers), self.cfg.vision_width),
            "CLS",
        )
        if feats is None:
            return None
        ip = self.projection_out(self.projection(feats.to(self.projection.weight.dtype).flatten(1)))  # (N, D)
        rows = image_rows(modality_mask, self.cfg.num_query_tokens)
        return torch.zeros(B, ip.shape[-1], dtype=ip.dtype, device=ip.device).index_add(0, rows, ip)

    def adapted(self, batch: Batch, cache: PeerCache | None, use_cache: bool) -> MethodOutput:
        """The image only through the prompts (its placeholders hidden)."""
        mm = modality(batch)
        x = self.llm.get_input_embeddings()(batch.input_ids)  # (B, T, D)
        if cache is not None:
            ip = cache.extra["image_prompt"]
        else:
            ip = self.image_prompt(mm, batch.pixel_values, batch.image_features, batch.rows)
        ctx = seq_context(self.llm, x, batch, cache, use_cache, hide=mm)
        x, layers = self.run_layers(x, ctx, ip, cache)
        gates = self.layer_gate_abs(self.first_adapted, torch.tanh(self.gates.detach()).abs().mean(-1))
        return self.output(x, ctx, layers, {"image_prompt": ip}, use_cache, gate_abs=gates)

    def _layer(self, i: int, base: nn.Module, x, ctx: SeqContext, ip, cache):
        attn = base.self_attn
        B, T, D = x.shape
        q, k, v = project_qkv(attn, base.input_layernorm(x), ctx.position_embeddings)  # (B, T, H|Hkv, Dh)
        k, v = extend(cache and cache[0], k), extend(cache and cache[1], v)
        o = ATTENTION_BACKENDS[self.backend](q, k, v, None, ctx.mask, attn.scaling)  # (B, T, H, Dh)
        j = i - self.first_adapted
        if j >= 0:
            o = o + self._prompt_attention(j, attn, q, ip, B)
        h = x + attn.o_proj(o.reshape(B, T, -1))
        return h + base.mlp(base.post_attention_layernorm(h)), (k, v)

    def _prompt_attention(self, j: int, attn: nn.Module, q: torch.Tensor, ip, B: int) -> torch.Tensor:
        """tanh(g_j) softmax(Q K_p^T / sqrt(Dh)) V_p: a second softmax over this layer's K prompts only."""
        L, Dh, H = self.cfg.prompt_len, attn.head_dim, q.shape[2]
        p = self.prompts.weight[j * L : (j + 1) * L]  # (K, D)
        p = p[None].expand(B, -1, -1) if ip is None else p[None] + ip[:, None]  # (B, K, D)
        p = p.to(attn.k_proj.weight.dtype)
        kp = expand_heads(attn.k_proj(p).view(B, L, -1, Dh), H)  # (B, K, H, Dh): raw prompt, no norm, no RoPE
        vp = expand_heads(attn.v_proj(p).view(B, L, -1, Dh), H)
        scores = torch.einsum("bthd,bkhd->bhtk", q, kp).float() * attn.scaling
        probs = F.softmax(scores, dim=-1).to(vp.dtype)
        out = torch.einsum("bhtk,bkhd->bthd", probs, vp)  # (B, T, H, Dh)
        return torch.tanh(self.gates[j]).to(out.dtype)[None, None, :, None] * out


SPEC = clip_peer_spec(
    LlamaAdapter,
    LlamaAdapterConfig,
    published="paper: 1.2M text-only (1,229,760 exact: multimodal=false), 1.8M with the image MLP (its shape "
    "is not published: reconstruction)",
    stages=(2,),
)
