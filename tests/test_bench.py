"""pipeline.bench on CPU: the whole sweep at the tiny preset under the real DeepSpeed engine, and its parts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from pipeline.bench import K, W, full_batch, length_mix, packed_batches, padded_batches, useful_flops
from pipeline.model.config import PILLConfig

REPO = Path(__file__).resolve().parents[1]


def test_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(
        # one untimed and one timed step per point: the code path, not the figures
        [sys.executable, "-m", "pipeline.bench", "--warmup", "1", "--steps", "1", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "need a GPU" in r.stdout and "MFU = " in r.stdout
    report = json.loads(out.read_text())
    assert not report["gpu"] and "need a GPU" in report["note"]
    roles = sorted((x["role"], x["layout"], x["checkpointing"]) for x in report["results"])
    assert roles == [
        ("packing", "packed", False),
        ("packing", "padded", False),
        ("reference", "full", False),
        ("sweep", "full", False),
        ("sweep", "full", True),
    ]
    for row in report["results"]:
        assert row["samples_per_s"] > 0 and math.isfinite(row["loss"]) and row["predicted_peak_gb"] > 0, row
    ref = next(x for x in report["results"] if x["role"] == "reference")
    assert (ref["attn"], ref["adapter"]) == ("eager", "eager")
    assert {x["reference"] for x in report["ratios"]} >= {ref["label"]}
    assert "| point |" in out.with_suffix(".md").read_text()


def test_packed_and_padded_batches_hold_the_same_samples():
    lengths = length_mix(40, 512)
    assert min(lengths) >= 48 and max(lengths) <= 512
    packed = packed_batches(lengths, 4 * 512, vocab=100)
    for bb in packed:
        b = bb.batch
        cu = b.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == b.input_ids.shape[1] <= 4 * 512
        assert [cu[i + 1] - cu[i] for i in range(len(cu) - 1)] == bb.docs
        assert int(b.modality_mask.sum()) == K * b.num_samples
        starts = (b.position_ids[0] == 0).nonzero().flatten().tolist()
        assert starts == cu[:-1]
    assert sum(sum(bb.docs) for bb in packed) == sum(lengths)  # every sample whole, once
    padded = padded_batches(lengths, 4, vocab=100)
    assert sum(sum(bb.docs) for bb in padded) == sum(lengths)
    assert all(int(bb.batch.attention_mask.sum()) == sum(bb.docs) for bb in padded)


def test_useful_flops_by_hand():
    c = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    cfg = PILLConfig(rank=8, vpg_width=W, num_query_tokens=K)
    bb = full_batch(2, 64, vocab=100)
    b = bb.batch
    n, m, d, L = 128, int((b.labels[:, 1:] != -100).sum()), 64, 2
    p_mm = L * (d * (d + 2 * 32) + d * d + 3 * d * 128)
    adapters = L * (3 * d * 8 + 3 * d * 8 + d * 4)
    want = 4 * n * p_mm + 4 * m * d * 100 + 6 * (n * adapters + 2 * K * W * d) + 7 * L * d * 2 * 64 * 64
    assert useful_flops(c, cfg, bb) == want
    assert torch.equal(b.labels[:, -1], b.input_ids[:, -1])  # the answer ends each sample
