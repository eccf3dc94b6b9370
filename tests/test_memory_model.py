"""pipeline.memory against what PyTorch actually holds, on CPU at small shapes.

Parameter and optimizer bytes are compared exactly. Activations are measured as the bytes of every distinct storage
autograd saves for the backward (saved_tensors_hooks), parameters excluded, and compared with the per-layer formula
within a tolerance (its small terms are approximations). The rest checks the model's internal consistency.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.memory import MemorySetup, ParamCounts, activation_bytes, estimate, layer_activation_bytes
from pipeline.model.batch import Batch
from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL
from pipeline.params import PRESETS, meta_pill
from pipeline.training.loss import answer_loss

K, W = 8, 32  # visual tokens per image, Q-former width


def _llm_config(**kw) -> LlamaConfig:
    base = dict(
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
    )
    return LlamaConfig(**{**base, **kw})


def _pill(llm_config: LlamaConfig, dtype: torch.dtype, **pill_kw) -> PILL:
    torch.manual_seed(0)
    cfg = PILLConfig(rank=8, vpg_width=W, num_query_tokens=K, **pill_kw)
    model = PILL(LlamaForCausalLM(llm_config), cfg).to(dtype)  # DeepSpeed bf16 casts trainables too
    return model.train()


def _batch(B: int, T: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    mm = torch.zeros(B, T, dtype=torch.bool)
    mm[:, 4 : 4 + K] = True
    return {
        "input_ids": torch.randint(0, 256, (B, T), generator=g),
        "modality_mask": mm,
        "image_features": torch.randn(B, K, W, generator=g).to(dtype),
    }


def all_logits_sum(model, batch: Batch) -> torch.Tensor:
    """The LM head at every position (what an evaluation forward computes), summed: something to backward."""
    return model.output_logits(model(batch)).float().sum()


def saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()  # the graph was complete

    return sum(seen.values())


CASES = [
    ("fp32 sdpa", torch.float32, {}, {"attn_backend": "sdpa", "adapter_backend": "eager"}, 2),
    ("bf16 sdpa", torch.bfloat16, {}, {"attn_backend": "sdpa", "adapter_backend": "eager"}, 2),
    ("bf16 eager attention", torch.bfloat16, {}, {"attn_backend": "eager", "adapter_backend": "eager"}, 2),
    ("bf16 GQA", torch.bfloat16, {"num_key_value_heads": 2}, {"attn_backend": "sdpa", "adapter_backend": "eager"}, 2),
    ("fp32 stage 1", torch.float32, {}, {"attn_backend": "sdpa", "adapter_backend": "eager"}, 1),
    (
        "fp32 no MoMAE/MAG",
        torch.float32,
        {},
        {"attn_backend": "sdpa", "adapter_backend": "eager", "momae": False, "mag": False},
        2,
    ),
]


@pytest.mark.parametrize("name,dtype,llm_kw,pill_kw,stage", CASES, ids=[c[0] for c in CASES])
def test_activations_match_what_autograd_saves(name, dtype, llm_kw, pill_kw, stage):
    B, T = 2, 64
    llm_config = _llm_config(**llm_kw)
    model = _pill(llm_config, dtype, stage=stage, **pill_kw)
    measured = saved_activation_bytes(model, lambda: all_logits_sum(model, Batch(**_batch(B, T, dtype))))
    s = MemorySetup(
        micro_batch=B,
        seq=T,
        precision="bf16" if dtype == torch.bfloat16 else "fp32",
        attn_backend=pill_kw["attn_backend"],
        adapter_backend=pill_kw["adapter_backend"],
    )
    per_layer = sum(layer_activation_bytes(llm_config, model.cfg, s).values())
    predicted = activation_bytes(llm_config, model.cfg, s, per_layer)
    assert predicted == pytest.approx(measured, rel=0.02), (name, predicted, measured)


def test_loss_saves_fp32_log_probs_at_answer_positions_only():
    """The training loss (pipeline.training.loss) keeps 4 m V bytes of fp32 log-probs, m = answer positions, never
    the (B, T, V) logits: the saved part of the memory model's "logits and loss" (the rest is its backward)."""
    B, T = 2, 64
    llm_config = _llm_config()
    model = _pill(llm_config, torch.bfloat16, attn_backend="sdpa", adapter_backend="eager")
    batch = _batch(B, T, torch.bfloat16)
    labels = torch.full((B, T), -100)
    labels[:, 40:] = batch["input_ids"][:, 40:]
    m = int((labels[:, 1:] != -100).sum())
    base = saved_activation_bytes(model, lambda: all_logits_sum(model, Batch(**batch)))
    with_loss = saved_activation_bytes(model, lambda: answer_loss(model, Batch(**batch, labels=labels)))
    assert with_loss - base == pytest.approx(4 * m * llm_config.vocab_size, rel=0.02), (with_loss - base, m)


def test_parameter_and_optimizer_bytes_are_exact():
    llm_config = _llm_config()
    model = _pill(llm_config, torch.float32, attn_backend="sdpa", adapter_backend="eager")
    counts = ParamCounts.of(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert counts.trainable == sum(p.numel() for p in trainable)
    assert counts.frozen_llm == sum(p.numel() for p in model.llm.parameters())
    out = model(Batch(**_batch(2, 32, torch.float32)))
    model.output_logits(out).float().pow(2).mean().backward()
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    moments = sum(st[k].numel() * st[k].element_size() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    weights_grads = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in trainable)
    s = MemorySetup(micro_batch=2, seq=32, precision="fp32", zero_stage=0)
    est = estimate(llm_config, model.cfg, counts, s)
    assert est.components["optimizer (fp32 master, Adam m, v)"] == moments
    assert est.components["trainable weights + grads"] == weights_grads
    assert est.components["frozen LLM weights"] == sum(p.numel() * 4 for p in model.llm.parameters())


def _seven_b(**setup) -> tuple:
    llm_config = LlamaConfig(**PRESETS["llama2-7b"])
    cfg = PILLConfig(stage=2)
    counts = ParamCounts.of(meta_pill(llm_config, cfg))
    return llm_config, cfg, counts, MemorySetup(micro_batch=4, seq=512, **setup)


def test_internal_consistency():
    llm_config, cfg, counts, s = _seven_b()
    base = estimate(llm_config, cfg, counts, s)
    assert base.peak == pytest.approx(
        sum(base.components.values()) - min(base.components["logits and loss"], base.components["backward transients"])
    )
    act = lambda e: next(v for k, v in e.components.items() if k.startswith("activations"))  # noqa: E731
    ck = estimate(llm_config, cfg, counts, dataclasses.replace(s, checkpointing=True))
    ck2 = estimate(llm_config, cfg, counts, dataclasses.replace(s, checkpointing=True, checkpoint_every=2))
    assert act(ck) < act(ck2) < act(base)
    # every layer wrapped: one input per layer plus one recomputed layer
    per_layer = sum(base.per_layer.values())
    assert act(ck) == pytest.approx(act(base) - 31 * per_layer + 32 * 2 * 4 * 512 * 4096, rel=1e-9)
    # ZeRO: the trainable state shrinks with the world; ZeRO-3 also partitions the frozen weights
    z2 = estimate(llm_config, cfg, counts, dataclasses.replace(s, world=8))
    z3 = estimate(llm_config, cfg, counts, dataclasses.replace(s, zero_stage=3, world=8))
    opt = "optimizer (fp32 master, Adam m, v)"
    assert z2.components[opt] == pytest.approx(base.components[opt] / 8)
    assert z2.components["frozen LLM weights"] == base.components["frozen LLM weights"] == 2 * counts.frozen_llm
    assert z3.components["frozen LLM weights"] < base.components["frozen LLM weights"] / 4
    # the reference formulation holds more: eager T x T attention scores, every expert on every token
    ref = estimate(llm_config, cfg, counts, dataclasses.replace(s, attn_backend="eager", adapter_backend="eager"))
    fast = estimate(llm_config, cfg, counts, dataclasses.replace(s, attn_backend="triton", adapter_backend="triton"))
    assert act(fast) < act(base) < act(ref)
    with pytest.raises(ValueError, match="MemorySetup.zero_stage"):
        MemorySetup(micro_batch=1, seq=8, zero_stage=4)


def test_params_memory_cli():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.params",
            "--memory",
            "--llm-preset",
            "llama2-7b",
            "--stage",
            "2",
            "--micro-batch",
            "4",
            "--seq",
            "512",
            "--checkpointing",
            "--zero",
            "2",
            "--world",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "frozen LLM weights" in r.stdout and "predicted peak" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("predicted_peak_gb=")


_DS_CHILD = r"""
import json, os, sys, torch
import deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.memory import MemorySetup, ParamCounts, estimate
from pipeline.model.batch import Batch
from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL
from pipeline.training.dist import init_distributed
from pipeline.training.loss import answer_loss

init_distributed()
torch.manual_seed(0)
c = LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)
model = PILL(LlamaForCausalLM(c), PILLConfig(rank=8, vpg_width=32, num_query_tokens=8, attn_backend="sdpa",
                                             adapter_backend="eager"))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-3)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
      "zero_optimization": {"stage": int(sys.argv[1]), "reduce_bucket_size": 50000, "contiguous_gradients": True}}
engine, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
mm = torch.zeros(2, 32, dtype=torch.bool); mm[:, 1:9] = True
batch = Batch(input_ids=torch.randint(0, 256, (2, 32)), modality_mask=mm, labels=torch.randint(0, 256, (2, 32)),
              image_features=torch.randn(2, 8, 32).bfloat16())
engine.backward(answer_loss(model, batch, engine(batch)))
engine.step()
master = sum(t.numel() * t.element_size() for t in opt.single_partition_of_fp32_groups)
moments = sum(st[k].numel() * st[k].element_size() for st in opt.optimizer.state.values()
              for k in ("exp_avg", "exp_avg_sq"))
s = MemorySetup(micro_batch=2, seq=32, zero_stage=int(sys.argv[1]), reduce_bucket_size=50000)
est = estimate(c, model.cfg, ParamCounts.of(model), s)
print(json.dumps({"measured": master + moments, "predicted": est.components["optimizer (fp32 master, Adam m, v)"],
                  "module_dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_optimizer_state_bytes(zero):
    """DeepSpeed's bf16 ZeRO optimizer on CPU, 1 rank: fp32 master partition + Adam moments as predicted (up to
    DeepSpeed's alignment padding of the flat partition; measured: equal)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        [sys.executable, "-c", _DS_CHILD, str(zero)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["module_dtypes"] == ["torch.bfloat16"]
    assert abs(got["measured"] - got["predicted"]) <= 12 * 64, got  # <= 64 padding elements x 12 bytes
