"""Trainable-parameter report: `python -m pipeline.params --llm-preset llama2-7b --stage 2`.

With `--memory` (and `--micro-batch --seq [--checkpointing] [--zero 2|3 --world N] ...`) it prints the predicted
peak memory per GPU by component instead (pipeline.memory); the last line is then `predicted_peak_gb=<float>`.

Builds the frozen LLM on the meta device (no weights, no memory, seconds) with PILL around it and prints the
trainable parameters per module group; the last line is `trainable=<integer>`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from pipeline.model.base import trainable_table
from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL, check_llm

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def meta_pill(llm_config, cfg: PILLConfig) -> PILL:
    with torch.device("meta"):
        return PILL(LlamaForCausalLM(llm_config), cfg)


def group_of(name: str) -> str:
    if name.startswith("projection."):
        return "projection P"
    m = re.match(r"blocks\.\d+\.([a-z_]+)\.", name)
    return {"adapter_v": "A_v (visual FFN expert)", "adapter_t": "A_t (text FFN expert)",
            "adapter_ffn": "A_ffn (shared FFN adapter)", "attn_adapter": "A_attn (attention adapter)",
            "gate": "W_g (MAG gate)"}.get(m.group(1) if m else "", "other")


def report(model: PILL) -> tuple[list[tuple[str, int, int]], int]:
    """[(group, trainable, total)] and the trainable total."""
    return trainable_table(model, group_of)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--llm-preset", choices=sorted(PRESETS), default="llama2-7b")
    src.add_argument("--llm", type=Path, help="a local transformers LLM directory (only config.json is read)")
    ap.add_argument("--stage", type=int, choices=(1, 2), default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--vpg-width", type=int, default=768)
    ap.add_argument("--adapter-act", choices=("swiglu", "gelu", "none"), default="swiglu")
    ap.add_argument("--no-momae", action="store_true")
    ap.add_argument("--no-mag", action="store_true")
    ap.add_argument("--no-attn-adapter", action="store_true")
    ap.add_argument("--method", default="pill", help="pill | llama_adapter | lavin | excitor | iaa (the peers: "
                    "pipeline.model.peers; the PILL flags above do not apply to them)")
    ap.add_argument("--method-config", default="{}", help="JSON overrides of the peer's config, e.g. "
                    "'{\"multimodal\": false}' or '{\"insert_after\": [0, 10, 20, 31]}'")
    from pipeline.memory import add_memory_args, print_memory

    add_memory_args(ap)
    args = ap.parse_args(argv)

    if args.llm is not None:
        if not (args.llm / "config.json").is_file():
            ap.error(f"--llm {args.llm}: no config.json there")
        llm_config = AutoConfig.from_pretrained(str(args.llm), local_files_only=True)
        check_llm(llm_config, str(args.llm / "config.json"))
        source = str(args.llm)
    else:
        llm_config = LlamaConfig(**PRESETS[args.llm_preset])
        source = args.llm_preset
    if args.method != "pill":
        return _peer_main(args, llm_config, source)
    cfg = PILLConfig(stage=args.stage, rank=args.rank, vpg_width=args.vpg_width, adapter_act=args.adapter_act,
                     momae=not args.no_momae, mag=not args.no_mag, attn_adapter=not args.no_attn_adapter)
    model = meta_pill(llm_config, cfg)
    if args.memory:
        return print_memory(args, llm_config, cfg, model, source)
    rows, n_trainable = report(model)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm."))
    print(f"PILL on {source}: d_model={llm_config.hidden_size} layers={llm_config.num_hidden_layers} "
          f"heads={llm_config.num_attention_heads} rank={cfg.rank} stage={cfg.stage}")
    print(f"{'group':32s} {'trainable':>14s} {'total':>14s}")
    for g, t, tot in rows:
        print(f"{g:32s} {t:>14,d} {tot:>14,d}")
    print(f"{'frozen LLM':32s} {0:>14,d} {n_frozen:>14,d}")
    print(f"trainable share of the LLM: {100 * n_trainable / n_frozen:.3f}%")
    print(f"trainable={n_trainable}")
    return 0


def _peer_main(args, llm_config, source: str) -> int:
    import json

    from pipeline.model.methods import get_method
    from pipeline.model.peers.counts import meta_peer, print_peer_memory, print_peer_report

    spec = get_method(args.method)
    overrides = json.loads(args.method_config)
    overrides.setdefault("stage", args.stage if args.stage in spec.stages else spec.stages[-1])
    model = meta_peer(args.method, llm_config, overrides)
    if args.memory:
        return print_peer_memory(args, args.method, model, source)
    return print_peer_report(args.method, model, source)


if __name__ == "__main__":
    raise SystemExit(main())
