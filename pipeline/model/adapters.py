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
from pill_kernels import build_route_schedule, routed_swiglu_adapter, weight_cache
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


# The fused kernel takes the experts' weights stacked (E, r, d), (E, r, d), (E, d, r); the experts stay separate
# Linear modules (their names are the export format). Stacking, and the kernel's compute-dtype copy of the stack,
# happen once per optimizer step per layer, not per call (pill_kernels.weight_cache, one cache emptied by one
# optimizer-step hook): every forward of a step (gradient-accumulation micro-batches, activation-checkpoint
# recomputation) gets a fresh view of the same cached stack, whose own autograd node splits the stacked gradient
# back to the experts, and the kernel's cast (keyed on the memory a view reads) hits for it. The stack is keyed on
# the ids of the 3E weights and anchored on them: a version bump (in-place update) or a new data_ptr (ZeRO-3
# gathers a parameter into new memory) misses, and the entry goes when its weights are freed.
def _stack(weights: list[torch.Tensor], num_experts: int) -> tuple[torch.Tensor, ...]:
    """(w_gate, w_down, w_up) stacked from the experts' weights, all gates first, then downs, then ups."""
    return tuple(torch.stack(weights[i * num_experts : (i + 1) * num_experts]) for i in range(3))


def _cached_stacks(weights: list[torch.Tensor], num_experts: int) -> tuple[torch.Tensor, ...]:
    key = tuple(id(w) for w in weights)
    return weight_cache.per_step(
        "stack", key, weights, weights, lambda: _stack([w.detach() for w in weights], num_experts)
    )


class _StackedExpertWeights(torch.autograd.Function):
    """Forward: views of the step's cached stacks (a new node per call, so micro-batches and recomputation each
    backpropagate through their own); backward: torch.stack's own (unbind), so each expert's fp32 gradient is
    bitwise what stacking per call gave."""

    @staticmethod
    def forward(ctx, num_experts: int, *weights: torch.Tensor):
        return tuple(s.view_as(s) for s in _cached_stacks(list(weights), num_experts))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, *(g for grad in grads for g in grad.unbind(0))


def stacked_expert_weights(experts: list[Adapter]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' (w_gate, w_down, w_up) stacked for the fused kernel, from the per-step cache. torch.compile
    (its graph stacks; the cache is host-side state it cannot trace, so it is asked first), meta tensors and
    inference mode (its tensors must not outlive it in a cache) stack per call."""
    ws = [e.stacked_weights() for e in experts]
    weights = [w[i] for i in range(3) for w in ws]
    if torch.compiler.is_compiling() or weights[0].is_meta or torch.is_inference_mode_enabled():
        return _stack(weights, len(experts))
    return _StackedExpertWeights.apply(len(experts), *weights)


def routed_adapter(
    x: torch.Tensor, route: torch.Tensor | None, experts: list[Adapter], backend: str, schedule=None
) -> torch.Tensor:
    """x + A_{route[t]}(x[t]) per token. `route` holds expert indices (TEXT=0, VISUAL=1).

    eager is PILL's reference formulation: every expert runs on every token and the output is selected, which
    is simple and exact but does E times the adapter work; triton computes only each token's own expert, with
    `schedule` (RouteSchedules.get) built once per forward instead of in every layer, and the experts' weights
    stacked and cast once per optimizer step (stacked_expert_weights).
    """
    if len(experts) == 1:
        route = None
    if backend == "triton":
        w_gate, w_down, w_up = stacked_expert_weights(experts)
        if schedule is None:
            schedule = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device) if route is None else route.long()
        return routed_swiglu_adapter(x, schedule, w_gate, w_down, w_up)
    if route is None:
        return experts[0](x)
    out = experts[0].delta(x)
    for e, expert in enumerate(experts[1:], start=1):
        out = torch.where((route == e).unsqueeze(-1), expert.delta(x), out)
    return x + out.to(x.dtype)
