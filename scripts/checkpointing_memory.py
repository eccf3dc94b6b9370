"""Activation memory with and without per-layer checkpointing, measured on CPU (no GPU needed).

    python scripts/checkpointing_memory.py [--d 512 --layers 8 --heads 8 --batch 4 --seq 512]

Builds a random Llama of the given shape with PILL (stage 2) around it, runs one training forward on a batch with
visual tokens, and measures (1) the bytes autograd keeps for the backward (saved_tensors_hooks, deduplicated by
storage) and (2) the process's peak RSS growth over the forward + backward, with and without
`apply_activation_checkpointing`. Losses and gradients are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.model import PILL, PILLConfig
from pipeline.model.batch import Batch
from pipeline.training.activation_checkpointing import apply_activation_checkpointing
from pipeline.training.loss import answer_loss


def saved_bytes(fn) -> tuple[int, torch.Tensor]:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def run(args, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.d,
        intermediate_size=int(args.d * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    model = PILL(
        LlamaForCausalLM(cfg),
        PILLConfig(stage=2, rank=32, num_query_tokens=32, vpg_width=768, attn_backend="sdpa", adapter_backend="eager"),
    )
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.normal_(0, 0.02)
    if checkpointing:
        apply_activation_checkpointing(model)
    B, T = args.batch, args.seq
    ids = torch.randint(5, 2000, (B, T))
    mm = torch.zeros(B, T, dtype=torch.bool)
    mm[:, 4:36] = True
    labels = ids.clone()
    labels[:, : T // 2] = -100
    feats = torch.randn(B, 32, 768)
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = Batch(ids, modality_mask=mm, labels=labels, image_features=feats)
    nbytes, loss = saved_bytes(lambda: answer_loss(model, batch))
    loss.backward()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    return {
        "saved_MB": nbytes / 2**20,
        "peak_rss_growth_MB": (rss1 - rss0) / 1024,
        "loss": float(loss.detach()),
        "grads": grads,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--only", choices=("with", "without"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.only:  # one measurement per process: ru_maxrss is a high-water mark
        res = run(args, args.only == "with")
        torch.save(res["grads"], f"/tmp/ckpt_mem_{args.only}.pt")
        print(json.dumps({k: v for k, v in res.items() if k != "grads"}))
        return
    rows = {}
    for mode in ("without", "with"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--only", mode], capture_output=True, text=True, check=True
        )
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    g0, g1 = torch.load("/tmp/ckpt_mem_without.pt"), torch.load("/tmp/ckpt_mem_with.pt")
    same = rows["with"]["loss"] == rows["without"]["loss"] and all(
        torch.allclose(g1[n], g, rtol=1e-5, atol=1e-7) for n, g in g0.items()
    )
    report = {
        "shape": {k: v for k, v in vars(args).items() if k != "only"},
        **rows,
        "equal_loss_and_grads": same,
        "saved_ratio": rows["with"]["saved_MB"] / rows["without"]["saved_MB"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
