"""Trainable-parameter report of any method: `python -m pipeline.params --llm-preset llama2-7b --stage 2`.

Builds the frozen LLM on the meta device (no weights, no memory, seconds) with the method around it (PILL by
default; `--method lavin` etc. for the peers, with a CLIP ViT-L/14 front end) and prints the trainable parameters
per module group, the method's published count, and as the last line `trainable=<integer>`.

With `--memory` (and `--micro-batch --seq [--checkpointing] [--zero 2|3 --world N] ...`) it prints the predicted
memory per GPU instead: by component for methods pipeline.memory models layer by layer (PILL; last line
`predicted_peak_gb=<float>`), the trainable state by ZeRO stage for the others (last line `predicted_state_gb=`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, LlamaConfig

from pipeline.memory import GB, MemorySetup, add_memory_args, print_memory, trainable_state_bytes
from pipeline.model import PILL, PILLConfig, check_llm, get_method, method_names
from pipeline.model.base import MethodSpec, trainable_table

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    ),
}
CONFIG_FLAGS = ("rank", "vpg_width", "adapter_act", "momae", "mag", "attn_adapter")
"""Shorthand flags, each setting the config field of its name (an error for a method without that field)."""


def meta_pill(llm_config, cfg: PILLConfig) -> PILL:
    return get_method("pill").meta_model(llm_config, cfg)


def meta_method(
    name: str, llm_config, overrides: dict[str, Any] | None = None, clip_preset: dict | None = None
) -> nn.Module:
    """The method `name` (its config from `overrides`) around a meta-device LLM of `llm_config`."""
    spec = get_method(name)
    return spec.meta_model(llm_config, spec.config_cls.from_dict(dict(overrides or {})), clip_preset=clip_preset)


def report(model: nn.Module, spec: MethodSpec | None = None) -> tuple[list[tuple[str, int, int]], int]:
    """[(group, trainable, total)] and the trainable total."""
    spec = spec or get_method(model.method)
    return trainable_table(model, spec.row_of)


def print_report(spec: MethodSpec, model: nn.Module, source: str) -> int:
    c = model.llm.config
    rows, n_trainable = report(model, spec)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm."))
    front = model.vpg
    front_desc = f"; CLIP width={front.width} blocks={front.num_layers}" if front is not None else ""
    print(
        f"{spec.name} on {source}: d_model={c.hidden_size} layers={c.num_hidden_layers} "
        f"heads={c.num_attention_heads} stage={model.cfg.stage}{front_desc}"
    )
    print(f"{'group':32s} {'trainable':>16s} {'total':>16s}")
    for g, t, tot in rows:
        print(f"{g:32s} {t:>16,d} {tot:>16,d}")
    print(f"{'frozen LLM':32s} {0:>16,d} {n_frozen:>16,d}")
    print(f"trainable share of the LLM: {100 * n_trainable / n_frozen:.3f}%")
    if spec.published:
        print(spec.published)
    print(f"trainable={n_trainable}")
    return 0


def print_state_memory(args: argparse.Namespace, name: str, model: nn.Module, source: str) -> int:
    """Per-GPU bytes of the trainable state (weights, grads, fp32 master, Adam) by ZeRO stage, and the frozen LLM:
    what decides the ZeRO stage of a method with billions of trainables (IAA)."""
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    frozen = sum(q.numel() for n, q in model.named_parameters() if n.startswith("llm."))
    elem = 2 if args.precision == "bf16" else 4
    print(
        f"{name} on {source}: trainable {p:,}, frozen LLM {frozen:,} ({frozen * elem / GB:.1f} GB in "
        f"{args.precision}, not partitioned except under ZeRO-3); world={args.world}; GB = 1e9 bytes"
    )
    print(f"{'ZeRO':>4s} {'trainable weights+grads':>24s} {'optimizer':>10s} {'+frozen LLM':>12s}")
    peak = 0.0
    for z in (0, 1, 2, 3):
        s = MemorySetup(
            micro_batch=args.micro_batch, seq=args.seq, precision=args.precision, zero_stage=z, world=args.world
        )
        parts = trainable_state_bytes(p, s, model.llm.config.hidden_size)
        w, o = parts["trainable weights + grads"], parts["optimizer (fp32 master, Adam m, v)"]
        fz = frozen * elem / (args.world if z == 3 else 1)
        print(f"{z:>4d} {w / GB:>24.2f} {o / GB:>10.2f} {(w + o + fz) / GB:>12.2f}")
        if z == args.zero:
            peak = (w + o + fz) / GB
    print("activations are not included (pipeline.memory models PILL's layers only)")
    print(f"predicted_state_gb={peak:.3f}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--llm-preset", choices=sorted(PRESETS), default="llama2-7b")
    src.add_argument("--llm", type=Path, help="a local transformers LLM directory (only config.json is read)")
    ap.add_argument("--method", default="pill", choices=method_names(), help="pipeline.model.methods' table")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=2, help="(a one-stage method: its stage)")
    ap.add_argument(
        "--method-config",
        default="{}",
        help="JSON overrides of the method's config, e.g. "
        "'{\"multimodal\": false}' or '{\"insert_after\": [0, 10, 20, 31]}'",
    )
    ap.add_argument("--rank", type=int)
    ap.add_argument("--vpg-width", type=int)
    ap.add_argument("--adapter-act", choices=("swiglu", "gelu", "none"))
    ap.add_argument("--no-momae", dest="momae", action="store_false", default=None)
    ap.add_argument("--no-mag", dest="mag", action="store_false", default=None)
    ap.add_argument("--no-attn-adapter", dest="attn_adapter", action="store_false", default=None)
    add_memory_args(ap)
    return ap


def method_overrides(args: argparse.Namespace, spec: MethodSpec, ap: argparse.ArgumentParser) -> dict[str, Any]:
    overrides = json.loads(args.method_config)
    fields = set(spec.config_cls.__dataclass_fields__)
    for flag in CONFIG_FLAGS:
        if getattr(args, flag) is not None:
            if flag not in fields:
                ap.error(f"--{flag.replace('_', '-')}: method {spec.name} has no config field {flag!r}")
            overrides[flag] = getattr(args, flag)
    overrides.setdefault("stage", args.stage if args.stage in spec.stages else spec.stages[-1])
    return overrides


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.llm is not None:
        if not (args.llm / "config.json").is_file():
            ap.error(f"--llm {args.llm}: no config.json there")
        llm_config = AutoConfig.from_pretrained(str(args.llm), local_files_only=True)
        check_llm(llm_config, str(args.llm / "config.json"))
        source = str(args.llm)
    else:
        llm_config, source = LlamaConfig(**PRESETS[args.llm_preset]), args.llm_preset
    spec = get_method(args.method)
    model = meta_method(args.method, llm_config, method_overrides(args, spec, ap))
    if args.memory and spec.layer_memory_model:
        return print_memory(args, llm_config, model.cfg, model, source)
    if args.memory:
        return print_state_memory(args, spec.name, model, source)
    return print_report(spec, model, source)


if __name__ == "__main__":
    raise SystemExit(main())
