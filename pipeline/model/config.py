"""PILL's configuration: which trainable modules exist, how they are initialised, and which stage trains them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.model.adapters import AdapterAct, AdapterBackend
from pipeline.model.attention import AttnBackend
from pipeline.model.base import MethodConfig

BLIP2_QUERY_TOKENS, BLIP2_WIDTH = 32, 768


@dataclass
class PILLConfig(MethodConfig):
    """Everything PILL adds to a frozen Llama-family LLM. Defaults reproduce the paper (docs/model.md)."""

    stage: int = 2
    """1 = modality alignment (train P and every A_v, no gate); 2 = fine-tuning (P, A_v, A_t, A_attn, W_g)."""
    rank: int = 32
    """Bottleneck width r of every adapter."""
    adapter_act: AdapterAct = "swiglu"
    """Adapter activation (paper Table 3): swiglu = U(SiLU(D1 x) * D2 x); gelu = U(GELU(D1 x)); none = U(D1 x)."""
    momae: bool = True
    """Mixture of modality adapter experts: A_v for visual tokens, A_t for text. False = one shared FFN adapter."""
    mag: bool = True
    """Modality attention gate: tanh(W_g a) scales the values of visual tokens per head (applied in stage 2)."""
    attn_adapter: bool = True
    """Shared SwiGLU adapter in front of the attention projections (trained in stage 2)."""
    num_query_tokens: int | None = None
    """K: visual tokens per image (BLIP-2's Q-former queries); None = the VPG's (32 without a VPG)."""
    vpg_width: int | None = None
    """Width of the Q-former output that the projection P maps to d_model; None = the VPG's (768 without one)."""
    invert_last_layer_routing: bool = True
    """Reference-code quirk: in stage 1 the LAST layer routes text tokens to A_v and visual tokens to A_t, so
    that A_v of the last layer gets a gradient (a visual token's last-layer output reaches no loss term)."""
    attn_backend: AttnBackend = "auto"
    """eager = plain PyTorch reference; sdpa = pre-gated values into scaled_dot_product_attention;
    triton = pill_kernels.gated_attention (gate applied inside the kernel); auto = triton on CUDA when it imports
    and passes a one-time self-check against the reference, else sdpa (pipeline.model.backends)."""
    adapter_backend: AdapterBackend = "auto"
    """eager = PILL's reference formulation (every expert on every token, then select);
    triton = pill_kernels.routed_swiglu_adapter (each token computes only its own expert), swiglu only;
    auto = triton on CUDA for swiglu when it passes its self-check, else eager."""
    projection_init_std: float = 0.02
    adapter_init_std: float = 0.02
    """Std of D2 (the linear branch); D1 keeps PyTorch's Linear init and U starts at zero."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"PILLConfig.stage must be 1 or 2, got {self.stage!r}")
        if self.rank < 1:
            raise ValueError(f"PILLConfig.rank must be >= 1, got {self.rank}")
        self._check_choices()
        if self.adapter_backend == "triton" and self.adapter_act != "swiglu":
            raise ValueError(
                "PILLConfig.adapter_backend='triton' fuses the SwiGLU adapter only; "
                f"adapter_act={self.adapter_act!r} needs adapter_backend='eager'"
            )
        for name in ("num_query_tokens", "vpg_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"PILLConfig.{name} must be >= 1 (or null: from the VPG), got {getattr(self, name)}")

    def take_front_end_shape(self, vpg: Any) -> None:
        """Fill K and the Q-former width left as None from the VPG (BLIP-2's 32 x 768 without one)."""
        if self.num_query_tokens is None:
            self.num_query_tokens = vpg.num_query_tokens if vpg is not None else BLIP2_QUERY_TOKENS
        if self.vpg_width is None:
            self.vpg_width = vpg.width if vpg is not None else BLIP2_WIDTH

    @property
    def gate_active(self) -> bool:
        """MAG scales visual values only in stage 2 (stage 1 leaves them unscaled)."""
        return self.mag and self.stage == 2
