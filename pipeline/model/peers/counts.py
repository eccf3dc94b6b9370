"""Trainable-parameter tables of the peers at any LLM shape, on the meta device (`pipeline.params --method M`).

The frozen LLM and a CLIP ViT-L/14 (the peers' front end; its shape matters for LaVIN's CLIP adapters) are built
on the meta device, the method around them; nothing is allocated. `PUBLISHED` holds the cards' counts and says
which ones this engine reproduces exactly and which are reconstructions (docs/peers.md).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import LlamaForCausalLM

from pipeline.model.base import trainable_table

PUBLISHED: dict[str, str] = {
    "llama_adapter": "paper: 1.2M text-only (1,229,760 exact: multimodal=false), 1.8M with the image MLP "
                     "(its shape is not published: reconstruction)",
    "lavin": "paper: 3.78M at 7B (exact)",
    "excitor": "paper: about 7.6M text-only (7,618,590: multimodal=false); the multimodal W_k/W_v are a reconstruction",
    "iaa": "paper: about 4.1B at Llama-3-8B for IAA-14 (--llm-preset llama3-8b), about 2.8B for IAA-8",
}


def meta_peer(name: str, llm_config, overrides: dict[str, Any] | None = None, clip_preset: dict | None = None):
    """The method `name` around a meta-device LLM of `llm_config` and a meta CLIP (ViT-L/14 by default)."""
    from pipeline.model.clip import meta_clip
    from pipeline.model.peers import PEERS

    cls, config_cls, _, _ = PEERS[name]
    cfg = config_cls.from_dict(dict(overrides or {}))
    clip = meta_clip(clip_preset)
    with torch.device("meta"):
        return cls(LlamaForCausalLM(llm_config), cfg, clip)


def group_of(name: str) -> str:
    """Module group of a trainable parameter name: its first component, layer indices folded away."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name).split(".")[0]


def peer_report(model) -> tuple[list[tuple[str, int, int]], int]:
    return trainable_table(model, group_of)


def print_peer_report(name: str, model, source: str) -> int:
    c = model.llm.config
    rows, n_trainable = peer_report(model)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm."))
    print(f"{name} on {source}: d_model={c.hidden_size} layers={c.num_hidden_layers} heads={c.num_attention_heads} "
          f"stage={model.cfg.stage}; CLIP width={model.vpg.width} blocks={model.vpg.num_layers}")
    print(f"{'group':32s} {'trainable':>16s} {'total':>16s}")
    for g, t, tot in rows:
        print(f"{g:32s} {t:>16,d} {tot:>16,d}")
    print(f"{'frozen LLM':32s} {0:>16,d} {n_frozen:>16,d}")
    print(f"trainable share of the LLM: {100 * n_trainable / n_frozen:.3f}%")
    print(PUBLISHED[name])
    print(f"trainable={n_trainable}")
    return 0


def print_peer_memory(args, name: str, model, source: str) -> int:
    """Per-GPU bytes of the trainable state (weights, grads, fp32 master, Adam) by ZeRO stage, and the frozen LLM:
    what decides the ZeRO stage of a method with billions of trainables (IAA)."""
    from pipeline.memory import GB, MemorySetup, trainable_state_bytes

    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    frozen = sum(q.numel() for n, q in model.named_parameters() if n.startswith("llm."))
    elem = 2 if args.precision == "bf16" else 4
    print(f"{name} on {source}: trainable {p:,}, frozen LLM {frozen:,} ({frozen * elem / GB:.1f} GB in "
          f"{args.precision}, not partitioned except under ZeRO-3); world={args.world}; GB = 1e9 bytes")
    print(f"{'ZeRO':>4s} {'trainable weights+grads':>24s} {'optimizer':>10s} {'+frozen LLM':>12s}")
    peak = 0.0
    for z in (0, 1, 2, 3):
        s = MemorySetup(micro_batch=args.micro_batch, seq=args.seq, precision=args.precision, zero_stage=z,
                        world=args.world)
        parts = trainable_state_bytes(p, s, model.llm.config.hidden_size)
        w, o = parts["trainable weights + grads"], parts["optimizer (fp32 master, Adam m, v)"]
        fz = frozen * elem / (args.world if z == 3 else 1)
        print(f"{z:>4d} {w / GB:>24.2f} {o / GB:>10.2f} {(w + o + fz) / GB:>12.2f}")
        if z == args.zero:
            peak = (w + o + fz) / GB
    print("activations are not included (pipeline.memory models PILL's layers only)")
    print(f"predicted_state_gb={peak:.3f}")
    return 0
