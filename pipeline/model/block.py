"""One PILL decoder layer: the frozen Llama layer's submodules with PILL's adapters and gate in place.

Legend: B batch, T new tokens, S cached + new tokens, D model width, H query heads, Hkv key/value heads,
Dh head width.

    x_n  = RMSNorm_attn(x)
    a    = x_n + A_attn(x_n)
    q, k, v = W_q a, W_k a, W_v a ; RoPE(q, k)
    g    = tanh(W_g a) at visual tokens, 1 at text tokens         (stage 2 with MAG)
    h    = x + W_o softmax(q k^T / sqrt(Dh) + causal) (g * v)
    h_n  = RMSNorm_ffn(h)
    out  = h + FFN(h_n + (A_v(h_n) if visual else A_t(h_n)))

q/k/v are the frozen layer's own (pipeline.model.seq.project_qkv: biases, Qwen3's q/k norms, rope scaling).
The frozen submodules are called (q_proj(a), not F.linear(a, q_proj.weight)) so DeepSpeed ZeRO-3 hooks fire.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.adapters import TEXT, VISUAL, Adapter, RouteSchedules, routed_adapter
from pipeline.model.attention import ATTENTION_BACKENDS, AttnMask
from pipeline.model.config import PILLConfig
from pipeline.model.seq import project_qkv

KVCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""Per layer: k after RoPE (B, S, Hkv, Dh), v UNgated (B, S, Hkv, Dh), value_gate (B, S, H) or None.
Values are cached ungated because the gate is per query head while v is per key/value head."""


class PILLBlock(nn.Module):
    """PILL's trainable parts of one layer; the frozen Llama layer is passed to forward as `base`."""

    def __init__(self, cfg: PILLConfig, d_model: int, n_heads: int, is_last: bool):
        super().__init__()
        self.cfg = cfg
        self.is_last = is_last
        mk = lambda: Adapter(d_model, cfg.rank, cfg.adapter_act, cfg.adapter_init_std)  # noqa: E731
        self.attn_adapter = mk() if cfg.attn_adapter else None
        self.gate = nn.Linear(d_model, n_heads, bias=False) if cfg.mag else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)  # visual values start fully gated off
        if cfg.momae:
            self.adapter_t, self.adapter_v, self.adapter_ffn = mk(), mk(), None
        else:
            self.adapter_t = self.adapter_v = None
            self.adapter_ffn = mk()
        # Resolved by PILL at its first forward (config "auto" -> what this device runs).
        self.attn_backend = cfg.attn_backend
        self.adapter_backend = cfg.adapter_backend

    @property
    def inverts_route(self) -> bool:
        return self.is_last and self.cfg.stage == 1 and self.cfg.invert_last_layer_routing

    def ffn_route(self, modality_mask: torch.Tensor) -> torch.Tensor:
        route = modality_mask.long()  # TEXT=0, VISUAL=1
        return 1 - route if self.inverts_route else route

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        base: nn.Module,  # the frozen transformers decoder layer
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        modality_mask: torch.Tensor,  # (B, T) bool
        mask: AttnMask,
        cache: KVCache | None = None,
        schedules: RouteSchedules | None = None,
        plugged: bool = True,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
        """(output, this layer's cache, mean |gate| over visual tokens and heads (detached) or None).

        `plugged=False` (PILL.adapters_off): the frozen layer alone, no adapter and no gate."""
        cfg, attn = self.cfg, base.self_attn
        B, T, _ = x.shape

        x_n = base.input_layernorm(x)
        a = self.attn_adapter(x_n) if self.attn_adapter is not None and plugged else x_n
        q, k, v = project_qkv(attn, a, position_embeddings)  # flash layout: the Triton kernel reads them as is

        value_gate = gate_abs = None
        if cfg.gate_active and plugged:
            g = torch.tanh(self.gate(a.to(self.gate.weight.dtype)))  # (B, T, H)
            gate_abs = _visual_mean(g.detach().abs(), modality_mask)
            value_gate = torch.where(modality_mask.unsqueeze(-1), g, torch.ones_like(g)).to(v.dtype)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=1)
            v = torch.cat([cache[1], v], dim=1)
            if value_gate is not None:
                value_gate = torch.cat([cache[2], value_gate], dim=1)
        new_cache = (k, v, value_gate)

        o = ATTENTION_BACKENDS[self.attn_backend](q, k, v, value_gate, mask, attn.scaling)  # (B, T, H, Dh)
        h = x + attn.o_proj(o.reshape(B, T, -1))

        h_n = base.post_attention_layernorm(h)
        if not plugged:
            return h + base.mlp(h_n), new_cache, None
        fused = self.adapter_backend == "triton" and schedules is not None
        if self.adapter_ffn is not None:
            f = routed_adapter(
                h_n, None, [self.adapter_ffn], self.adapter_backend, schedules.get(False, 1) if fused else None
            )
        else:
            experts = [None, None]
            experts[TEXT], experts[VISUAL] = self.adapter_t, self.adapter_v
            f = routed_adapter(
                h_n,
                self.ffn_route(modality_mask),
                experts,
                self.adapter_backend,
                schedules.get(self.inverts_route, 2) if fused else None,
            )
        return h + base.mlp(f), new_cache, gate_abs


def _visual_mean(x_BTH: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
    """Mean over visual tokens and heads, without a host sync (0 when there is no visual token)."""
    m = modality_mask.unsqueeze(-1).to(x_BTH.dtype)
    return (x_BTH * m).sum() / (m.sum() * x_BTH.shape[-1]).clamp(min=1)
