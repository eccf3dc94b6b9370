"""Predicted peak memory of one PILL training rank, by component (`python -m pipeline.params --memory ...`).

The parameter counts come from the real model built on the meta device (exact); the rest is the arithmetic below.
n = B x T tokens per micro-batch; d model width, F FFN width, V vocab, L layers, H query heads, d_kv = H_kv x D_h,
r adapter rank, e bytes per activation / frozen-weight element (2 in bf16, 4 in fp32), N ranks; P_f frozen LLM
parameters, P_vpg frozen VPG parameters (0 with precomputed features), P_t trainable parameters.

    peak = frozen weights + trainable state + activations + max(logits and loss, backward transients)

frozen weights        e (P_f + P_vpg), divided by N under ZeRO-3 (which partitions every parameter), plus the two
                      gathered layers ZeRO-3 holds at a time (the current one and the prefetched one): 2 e P_layer.
trainable state       bytes per trainable parameter, DeepSpeed's layout (bf16 module copy, fp32 master + moments):
                        bf16   ZeRO-0: 2 weight + 2 grad + 4 master + 4 fp32 grad accumulator + 8 Adam = 20
                               ZeRO-1: 2 + 2 + (4 + 8) / N;  ZeRO-2: 2 + (2 + 4 + 8) / N + bucket;
                               ZeRO-3: (2 + 2 + 4 + 8) / N + bucket  (ZeRO-1/2/3 build the fp32 gradient of
                               their partition, 4/N, only inside the optimizer step, when activations are gone)
                        fp32   ZeRO-0: 4 weight + 4 grad + 8 Adam = 16; ZeRO-1: 4 + 4 + 8/N; ZeRO-2: 4 + (4 + 8)/N
                               + bucket; ZeRO-3: 16/N + bucket.   bucket = reduce_bucket_size x e (x 2 with
                               overlap_comm): DeepSpeed allocates the whole contiguous-gradient buffer at every
                               backward, whatever the trainable count (ds_configs/zero2.json's 5e8 = 1 GB in bf16).
activations           what autograd saves for the backward, per layer (frozen linears save no input: only weights,
                      which are parameters; every layer still saves what its trainable adapters and the
                      backward through the frozen nonlinearities need):
                        2 RMSNorms              2 (4 n d + 4 n)         fp32 copy of the input + rsqrt
                        attention adapter A_attn  e n d + 4 e n r       its input + SwiGLU's four (n, r) tensors
                        MAG gate W_g            e n d + e n H          its input a, tanh(W_g a)
                        attention  sdpa         e (q + k + v + o) + 4 n H (lse); with the gate or GQA, K/V are
                                                expanded to H heads and V is also kept ungated: 5 e n d
                                   triton       e (2 n d + 2 n d_kv + n H) + 4 n H   (q, k, v, gate, o, lse)
                                   eager        q, k, V, gated V (4 e n d) + softmax out (4 B H T^2) + bf16 P
                                                (e B H T^2): the T x T matrices
                        FFN adapters eager      e n d + E x 4 e n r     every expert on every token (reference)
                                     triton     e n d + 8 n r + 3 E d r e   (own expert only; fp32 (n, r) x 2,
                                                the stacked weights)
                        frozen SwiGLU MLP       3 e n F                silu in, silu out, up out
                      plus once: the final RMSNorm (4 n d), RoPE cos/sin (2 e n D_h), P's input features.
                      Frozen adapters (stage 1's A_t, A_attn) keep 3 e n r and no input.
                      Per-layer activation checkpointing (torchtitan-style: every `every`-th layer wrapped): a
                      wrapped layer keeps only its input (e n d); the backward recomputes one layer at a time, so
                      one full layer's set is added once.
logits and loss       (e + 12) m V: the LM head at the m answer positions only (training: pipeline.training.
                      loss.AnswerCrossEntropy), their fp32 copy saved as log-probs, and in the backward their fp32
                      gradient and the logits' gradient; m = all n tokens at most. With full_logits (the
                      (B, T, V) logits returned as well) add e n V.
backward transients   e (2 n d + 2 n F): gradients in flight through one layer (residual, MLP intermediates).

Measured against this on CPU (tests/test_memory_model.py): parameter and optimizer bytes exactly, saved activation
bytes within a few percent; on a GPU `python -m pipeline.bench` prints prediction and measured peak side by side.
The CUDA context (~0.5 GB, outside the allocator) and the allocator's fragmentation are not included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import Blip2Config

from pipeline.model.adapters import ADAPTER_BACKENDS
from pipeline.model.attention import ATTENTION_BACKENDS
from pipeline.model.vpg import VPG

Precision = Literal["bf16", "fp32"]
GB = 1e9


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of one PILL (from the meta-device model)."""

    frozen_llm: int
    frozen_vpg: int
    trainable: int
    largest_layer: int
    """Frozen parameters of the largest decoder layer (what ZeRO-3 gathers at once)."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParamCounts:
        llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm."))
        vpg = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vpg."))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        layers = model.llm.model.layers
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        return cls(llm, vpg, trainable, largest)


@dataclass
class MemorySetup:
    """One rank's training setup: shapes, precision, ZeRO and the backends the model will run."""

    micro_batch: int
    seq: int
    precision: Precision = "bf16"
    zero_stage: int = 2
    world: int = 1
    checkpointing: bool = False
    checkpoint_every: int = 1
    """Wrap every n-th decoder layer (1 = all), as torchtitan's selective per-layer checkpointing."""
    attn_backend: Literal[tuple(ATTENTION_BACKENDS)] = "sdpa"
    adapter_backend: Literal[ADAPTER_BACKENDS] = "eager"
    images_per_sample: int = 1
    loss_positions: int | None = None
    """Answer (label) positions per micro-batch, where the loss runs the LM head in fp32; None = all B x T."""
    full_logits: bool = False
    """The forward also returns the (B, T, V) logits (evaluation); training computes answer rows only."""
    reduce_bucket_size: int | None = None
    """ZeRO-2/3 gradient bucket in elements; None = d^2 (what fill_ds_config writes for "auto")."""
    overlap_comm: bool = False
    """ZeRO-2/3 double-buffers the gradient bucket when communication overlaps the backward."""

    def __post_init__(self) -> None:
        for name in ("micro_batch", "seq", "world", "checkpoint_every", "images_per_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"MemorySetup.{name} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"MemorySetup.zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"MemorySetup.precision must be bf16|fp32, got {self.precision!r}")

    @property
    def elem_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq


@dataclass
class MemoryEstimate:
    """Bytes per component; `per_layer` itemises one decoder layer's saved activations."""

    components: dict[str, float]
    per_layer: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        c = self.components
        static = sum(v for k, v in c.items() if k not in ("logits and loss", "backward transients"))
        return static + max(c.get("logits and loss", 0.0), c.get("backward transients", 0.0))

    def table(self) -> str:
        rows = [f"{'component':40s} {'GB':>9s}"]
        rows += [f"{k:40s} {v / GB:9.3f}" for k, v in self.components.items()]
        rows.append(f"{'predicted peak (transients overlap)':40s} {self.peak / GB:9.3f}")
        if self.per_layer:
            rows.append("one decoder layer's saved activations:")
            rows += [f"  {k:38s} {v / GB:9.4f}" for k, v in self.per_layer.items()]
        return "\n".join(rows + self.notes)


# ---- the model's arithmetic ----------------------------------------------------------------------------------------


def trainable_state_bytes(p: int, s: MemorySetup, d_model: int) -> dict[str, float]:
    """Module weights + gradients, and the optimizer's fp32 master + Adam moments, per rank."""
    n, z = s.world, s.zero_stage
    bucket = 0
    if z >= 2:
        bucket = (s.reduce_bucket_size or d_model * d_model) * s.elem_bytes * (2 if s.overlap_comm else 1)
    if s.precision == "bf16":
        weight = 2 * p / (n if z == 3 else 1)
        grad = 2 * p / (n if z >= 2 else 1) + bucket
        master = (4 + 4) * p if z == 0 else 4 * p / n  # ZeRO-0 (BF16_Optimizer) adds an fp32 grad accumulator
    else:
        weight = 4 * p / (n if z == 3 else 1)
        grad = 4 * p / (n if z >= 2 else 1) + bucket
        master = 0.0
    adam = 8 * p / (n if z >= 1 else 1)
    return {"trainable weights + grads": weight + grad, "optimizer (fp32 master, Adam m, v)": master + adam}


def _swiglu_saved(n: int, d: int, r: int, e: int, act: str, trainable: bool, input_counted: bool) -> float:
    """One adapter: its input (if not already kept) plus the bottleneck intermediates autograd saves."""
    per_act = {"swiglu": 4, "gelu": 2, "none": 1}[act]
    if not trainable:
        return (per_act - 1) * e * n * r  # the output projection U is frozen: its input is not kept
    return (0 if input_counted else e * n * d) + per_act * e * n * r


def layer_activation_bytes(llm_config, cfg, s: MemorySetup) -> dict[str, float]:
    """One decoder layer's saved tensors, by part (see the module docstring)."""
    c = llm_config
    n, e, B, T = s.tokens, s.elem_bytes, s.micro_batch, s.seq
    d, F, H = c.hidden_size, c.intermediate_size, c.num_attention_heads
    dh = getattr(c, "head_dim", None) or d // H
    dkv = c.num_key_value_heads * dh
    r = cfg.rank
    stage2 = cfg.stage == 2
    out = {"2 RMSNorms (fp32 copies)": 2 * (4 * n * d + 4 * n)}
    if cfg.attn_adapter:
        out["attention adapter"] = _swiglu_saved(n, d, r, e, cfg.adapter_act, stage2, False)
    gated = cfg.mag and stage2
    if gated:
        out["MAG gate"] = e * n * d + e * n * H  # a (its input) and tanh(W_g a)
    expand = gated or dkv != d
    if s.attn_backend == "triton":
        att = e * (2 * n * d + 2 * n * dkv + (n * H if gated else 0)) + 4 * n * H
    elif s.attn_backend == "sdpa":
        att = e * (n * d + (n * d if expand else n * dkv) * 2 + n * d) + 4 * n * H
        if gated:
            att += e * n * d + e * n * H  # the ungated expanded V and the gate, kept by the gating product
    else:  # eager: the materialised T x T scores
        att = e * (n * d * (4 if gated else 3)) + 4 * B * H * T * T + (e * B * H * T * T if e != 4 else 0)
        att += e * n * H if gated else 0
    out[f"attention ({s.attn_backend})"] = att
    experts = [("t", stage2), ("v", True)] if cfg.momae else [("ffn", True)]
    if s.adapter_backend == "triton":
        n_exp = len(experts)
        out["FFN adapters (triton)"] = e * n * d + 8 * n * r + 3 * n_exp * d * r * e + 16 * n
    else:
        saved = e * n * d  # h_n, shared by every expert
        saved += sum(_swiglu_saved(n, d, r, e, cfg.adapter_act, tr, True) for _, tr in experts)
        out["FFN adapters (eager: every expert)"] = saved + (len(experts) - 1) * n
    out["frozen MLP (silu in/out, up)"] = 3 * e * n * F
    return out


def activation_bytes(llm_config, cfg, s: MemorySetup, per_layer: float) -> float:
    c = llm_config
    n, e, L = s.tokens, s.elem_bytes, c.num_hidden_layers
    d = c.hidden_size
    dh = getattr(c, "head_dim", None) or d // c.num_attention_heads
    once = 4 * n * d + 4 * n + 2 * e * n * dh  # final norm, cos/sin
    once += e * s.micro_batch * s.images_per_sample * cfg.num_query_tokens * cfg.vpg_width  # P's input
    if not s.checkpointing:
        return L * per_layer + once
    wrapped = len(range(0, L, s.checkpoint_every))
    return wrapped * e * n * d + (L - wrapped) * per_layer + per_layer + once


def estimate(llm_config, cfg, counts: ParamCounts, s: MemorySetup) -> MemoryEstimate:
    """Predicted per-rank peak for PILL (config `cfg`) on a frozen LLM (config `llm_config`)."""
    c = llm_config
    e, n, V = s.elem_bytes, s.tokens, c.vocab_size
    z3 = s.zero_stage == 3
    comps: dict[str, float] = {}
    comps["frozen LLM weights"] = e * counts.frozen_llm / (s.world if z3 else 1) + (
        2 * e * counts.largest_layer if z3 else 0
    )
    if counts.frozen_vpg:
        comps["frozen VPG weights"] = e * counts.frozen_vpg / (s.world if z3 else 1)
    comps.update(trainable_state_bytes(counts.trainable, s, c.hidden_size))
    per_layer = layer_activation_bytes(c, cfg, s)
    comps["activations" + (f" (checkpointing every {s.checkpoint_every})" if s.checkpointing else "")] = (
        activation_bytes(c, cfg, s, sum(per_layer.values()))
    )
    m = n if s.loss_positions is None else min(n, s.loss_positions)
    comps["logits and loss"] = (e * n * V if s.full_logits else 0) + (e + 12) * m * V
    comps["backward transients"] = e * (2 * n * c.hidden_size + 2 * n * c.intermediate_size)
    notes = [
        f"(n = {s.micro_batch} x {s.seq} = {n} tokens; {s.precision}; ZeRO-{s.zero_stage} over {s.world} "
        f"rank(s); trainable {counts.trainable:,}, frozen LLM {counts.frozen_llm:,}, VPG {counts.frozen_vpg:,}; "
        "CUDA context not included)"
    ]
    return MemoryEstimate(comps, per_layer, notes)


def blip2_vpg_params() -> int:
    """BLIP-2's ViT-g/14 + Q-former + 32 queries (transformers' default Blip2Config), counted on meta."""
    with torch.device("meta"):
        return sum(p.numel() for p in VPG(Blip2Config()).parameters())


def ds_bucket(path: Path, required: bool = False) -> tuple[int | None, bool]:
    """(reduce_bucket_size or None for "auto"/absent, overlap_comm) of a DeepSpeed JSON."""
    if not path.is_file():
        if required:
            raise SystemExit(f"--ds-config {path}: file not found")
        return None, False
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except json.JSONDecodeError as e:
        raise SystemExit(f"--ds-config {path}: not valid JSON ({e})") from None
    bucket = zero.get("reduce_bucket_size")
    return (int(bucket) if isinstance(bucket, (int, float)) else None), bool(zero.get("overlap_comm", False))


# ---- command line (pipeline.params --memory) ------------------------------------------------------------------------


def add_memory_args(ap) -> None:
    g = ap.add_argument_group("memory model (--memory)")
    g.add_argument("--memory", action="store_true", help="print the predicted peak memory per GPU by component")
    g.add_argument("--micro-batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--checkpointing", action="store_true", help="per-decoder-layer activation checkpointing")
    g.add_argument("--checkpoint-every", type=int, default=1, help="wrap every n-th layer (with --checkpointing)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    g.add_argument("--world", type=int, default=1, help="data-parallel ranks ZeRO partitions over")
    g.add_argument(
        "--ds-config",
        type=Path,
        default=None,
        help="read reduce_bucket_size / overlap_comm from this DeepSpeed JSON (default: "
        "ds_configs/zero<N>.json when it exists)",
    )
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    g.add_argument(
        "--vpg",
        choices=("features", "blip2"),
        default="features",
        help="precomputed Q-former features (no VPG on the GPU) or the frozen BLIP-2 ViT-g + Q-former",
    )
    g.add_argument("--attn-backend", choices=tuple(ATTENTION_BACKENDS), default="sdpa")
    g.add_argument("--adapter-backend", choices=ADAPTER_BACKENDS, default="eager")
    g.add_argument(
        "--loss-positions",
        type=int,
        default=None,
        help="answer positions per micro-batch (default: all micro-batch x seq, the worst case)",
    )


def print_memory(args, llm_config, cfg, model: torch.nn.Module, source: str) -> int:
    counts = ParamCounts.of(model)
    if args.vpg == "blip2":
        counts = ParamCounts(counts.frozen_llm, blip2_vpg_params(), counts.trainable, counts.largest_layer)
    ds_path = args.ds_config or Path(__file__).resolve().parents[1] / "ds_configs" / f"zero{args.zero}.json"
    bucket, overlap = ds_bucket(ds_path, required=args.ds_config is not None)
    try:
        s = MemorySetup(
            micro_batch=args.micro_batch,
            seq=args.seq,
            precision=args.precision,
            zero_stage=args.zero,
            world=args.world,
            checkpointing=args.checkpointing,
            checkpoint_every=args.checkpoint_every,
            attn_backend=args.attn_backend,
            adapter_backend=args.adapter_backend,
            loss_positions=args.loss_positions,
            reduce_bucket_size=bucket,
            overlap_comm=overlap,
        )
    except ValueError as e:
        raise SystemExit(f"pipeline.params --memory: {e}") from None
    est = estimate(llm_config, cfg, counts, s)
    print(
        f"PILL on {source}, stage {cfg.stage}, {args.attn_backend} attention, {args.adapter_backend} adapters, "
        f"VPG: {args.vpg}; predicted per-GPU memory (GB = 1e9 bytes):"
    )
    print(est.table())
    print(f"predicted_peak_gb={est.peak / GB:.3f}")
    return 0
