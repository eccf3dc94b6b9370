"""PILL's adapters: the SwiGLU adapter and the modality-routed experts (MoMAE).

A(x) = U(SiLU(D1 x) * D2 x), D1, D2: d -> r, U: r -> d, no biases. Inits follow the reference code: D1 keeps
PyTorch's default Linear init, D2 ~ N(0, 0.02), U = 0, so every adapter outputs exactly 0 at initialisation
and PILL starts as the frozen LLM. Adapters return x + A(x): the spec adds the adapter's output to the normed
input in front of the frozen sublayer.

Adapters compute in their own (fp32) parameter dtype and hand back the caller's dtype, so a bf16 frozen LLM
can carry fp32 trainables.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pill_kernels import build_route_schedule, routed_swiglu_adapter
from torch import nn

AdapterAct = Literal["swiglu", "gelu", "none"]
ADAPTER_BACKENDS = ("eager", "triton")
"""eager: every expert on every token, then select (PILL's reference formulation); triton: the fused kernel."""
ADAPTER_BACKEND_CHOICES = ("auto", *ADAPTER_BACKENDS)
AdapterBackend = Literal[ADAPTER_BACKEND_CHOICES]
TEXT, VISUAL = 0, 1  # expert index per token, as kernels.routed_swiglu_adapter expects


class Adapter(nn.Module):
    """One bottleneck adapter; `act` picks the paper's Table 3 variant."""

    def __init__(self, d_model: int, rank: int, act: AdapterAct = "swiglu", init_std: float = 0.02):
        super().__init__()
        self.act = act
        self.d1 = nn.Linear(d_model, rank, bias=False)  # SiLU branch (or the only down-projection)
        self.d2 = nn.Linear(d_model, rank, bias=False) if act == "swiglu" else None  # linear branch
        self.u = nn.Linear(rank, d_model, bias=False)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.d1.reset_parameters()
        if self.d2 is not None:
            nn.init.normal_(self.d2.weight, std=self.init_std)
        nn.init.zeros_(self.u.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """A(x) in the adapter's dtype."""
        x = x.to(self.d1.weight.dtype)
        if self.act == "swiglu":
            h = F.silu(self.d1(x)) * self.d2(x)
        elif self.act == "gelu":
            h = F.gelu(self.d1(x))
        else:
            h = self.d1(x)
        return self.u(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x).to(x.dtype)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_gate, w_down, w_up) as (r, d), (r, d), (d, r) for the fused kernel."""
        return self.d1.weight, self.d2.weight, self.u.weight


class RouteSchedules:
    """The fused kernel's expert schedules for one model forward, built once and shared by every layer: the route
    is the same in all layers (only stage 1's last layer inverts it, which gets its own schedule)."""

    def __init__(self, modality_mask: torch.Tensor):
        self.modality_mask = modality_mask
        self._built: dict[tuple[bool, int], object] = {}

    def get(self, inverted: bool, num_experts: int):
        key = (inverted, num_experts)
        if key not in self._built:
            route = (
                self.modality_mask.long() if num_experts > 1 else torch.zeros_like(self.modality_mask, dtype=torch.long)
            )
            self._built[key] = build_route_schedule(1 - route if inverted else route, num_experts)
        return self._built[key]


def routed_adapter(
    x: torch.Tensor, route: torch.Tensor | None, experts: list[Adapter], backend: str, schedule=None
) -> torch.Tensor:
    """x + A_{route[t]}(x[t]) per token. `route` holds expert indices (TEXT=0, VISUAL=1).

    eager is PILL's reference formulation: every expert runs on every token and the output is selected, which
    is simple and exact but does E times the adapter work; triton computes only each token's own expert, with
    `schedule` (RouteSchedules.get) built once per forward instead of in every layer.
    """
    if len(experts) == 1:
        route = None
    if backend == "triton":
        # The experts stay separate Linear modules (their names are the export format), so their weights are
        # stacked per call: 3 x E x r x d fp32 (1.5 MB per layer at 7B), small beside the layer's frozen weights.
        ws = [e.stacked_weights() for e in experts]
        w_gate = torch.stack([w[0] for w in ws])
        w_down = torch.stack([w[1] for w in ws])
        w_up = torch.stack([w[2] for w in ws])
        if schedule is None:
            schedule = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device) if route is None else route.long()
        return routed_swiglu_adapter(x, schedule, w_gate, w_down, w_up)
    if route is None:
        return experts[0](x)
    out = experts[0].delta(x)
    for e, expert in enumerate(experts[1:], start=1):
        out = torch.where((route == e).unsqueeze(-1), expert.delta(x), out)
    return x + out.to(x.dtype)
