"""Per-module learning rates (optim.lr_scale): keys name the method's groups (pipeline.params' rows), an unknown
one is a config error listing them before launch, and the real DeepSpeed engine steps each group at its scaled lr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.model import PILLConfig, get_method, load_pill
from pipeline.model.batch import Batch
from pipeline.training.config import ConfigError, ModelConfig, OptimConfig
from pipeline.training.loss import answer_loss
from pipeline.training.optim import (
    build_optimizer,
    build_scheduler,
    describe_lrs,
    lr_by_group,
    method_groups,
    param_groups,
    resolve_lr_scale,
)

REPO = Path(__file__).resolve().parents[1]
PILL_GROUPS = [
    "A_attn (attention adapter)",
    "A_t (text FFN expert)",
    "A_v (visual FFN expert)",
    "W_g (MAG gate)",
    "projection P",
]


def test_the_groups_are_pipeline_params_rows_and_keys_may_be_their_symbols():
    assert method_groups(ModelConfig()) == PILL_GROUPS
    got = resolve_lr_scale({"A_t": 0.1, "W_g (MAG gate)": 3, "projection": 2}, PILL_GROUPS, "pill")
    assert got == {"A_t (text FFN expert)": 0.1, "W_g (MAG gate)": 3.0, "projection P": 2.0}
    assert "adapters" in method_groups(ModelConfig(method="lavin"))


@pytest.mark.parametrize("key", ["A_x", "adapters", "A"])
def test_an_unknown_group_is_a_config_error_listing_the_groups(key):
    with pytest.raises(ConfigError) as e:
        resolve_lr_scale({key: 0.5}, PILL_GROUPS, "pill")
    msg = str(e.value)
    assert repr(key) in msg and all(g in msg for g in PILL_GROUPS) and "key: A_attn" in msg


def test_two_keys_for_one_group_and_bad_factors_are_errors():
    with pytest.raises(ConfigError, match="two keys"):
        resolve_lr_scale({"A_t": 0.5, "A_t (text FFN expert)": 2}, PILL_GROUPS, "pill")
    for bad in (-1, -0.5, float("nan"), float("inf"), "fast", True):
        with pytest.raises(ConfigError, match="optim.lr_scale.A_t"):
            OptimConfig(lr_scale={"A_t": bad})


def test_train_refuses_an_unknown_group_before_launch(tmp_path, capsys):
    """pipeline.train's own config check: exit 2 and the method's groups, before any process group or model."""
    from pipeline.train import EXIT_CONFIG, main

    rc = main(["--config", "demo", "--output-dir", str(tmp_path / "run"), "--set", "optim.lr_scale.A_text=0.1"])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG and "'A_text' is not a group of method pill" in err and "A_t (text FFN expert)" in err
    assert not (tmp_path / "run").exists()


def test_param_groups_split_by_factor_base_first():
    model = load_pill("tiny", None, PILLConfig(stage=2, rank=4, vpg_width=64, num_query_tokens=8), torch.float32)
    spec = get_method("pill")
    plain = param_groups(model.trainable_parameters(), OptimConfig())
    assert len(plain) == 2 and {g["lr_scale"] for g in plain} == {1.0}  # what it always was
    scale = {"A_t (text FFN expert)": 0.25, "A_attn (attention adapter)": 0.25, "projection P": 4.0}
    groups = param_groups(model.trainable_parameters(), OptimConfig(), spec.row_of, scale)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.25, 4.0]  # gates: no decay; projection: decay only
    assert [g["label"] for g in groups] == ["base", "base", "A_attn+A_t", "projection P"]
    for g in groups:
        assert {scale.get(spec.row_of(n), 1.0) for n in g["names"]} == {g["lr_scale"]}
    opt = build_optimizer(groups, 1e-3, OptimConfig(), cpu_offload=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 2.5e-4, 4e-3])
    assert lr_by_group(opt, 1e-3) == pytest.approx({"lr/base": 1e-3, "lr/A_attn+A_t": 2.5e-4, "lr/projection P": 4e-3})
    assert "A_attn+A_t 2.500e-04 (x0.25)" in describe_lrs(opt)


def test_deepspeed_steps_each_group_at_its_scaled_lr(dist_world_of_one):
    """ZeRO-2 on CPU: after warmup, the scheduler's lr of each optimizer group is the base times its factor, and the
    first Adam step moves each zero-initialised U by exactly its group's lr (Adam's first step is lr x sign(g)), and a
    factor 0 freezes its group exactly, weight decay included."""
    import deepspeed

    torch.manual_seed(0)
    model = load_pill("tiny", None, PILLConfig(stage=2, rank=4, vpg_width=64, num_query_tokens=8), torch.float32)
    model.train()
    spec = get_method("pill")
    scale = resolve_lr_scale({"A_t": 0.25, "A_attn": 0}, method_groups(ModelConfig()), "pill")
    optim = OptimConfig(lr_scale={"A_t": 0.25, "A_attn": 0}, weight_decay=0.1)
    groups = param_groups(model.trainable_parameters(), optim, spec.row_of, scale)
    opt = build_optimizer(groups, 1e-2, optim, cpu_offload=False)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, min_lr_ratio=1.0)
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    lrs = {g["label"]: lr for g, lr in zip(engine.optimizer.param_groups, sched.get_last_lr())}
    assert lrs == pytest.approx({"base": 1e-2, "A_t": 2.5e-3, "A_attn": 0.0})
    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    ids = torch.randint(3, 500, (2, 12))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    loss = answer_loss(model, batch, engine(batch))
    engine.backward(loss)
    engine.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.trainable_parameters()}
    assert moved["blocks.0.adapter_t.u.weight"] == pytest.approx(2.5e-3, rel=1e-3)
    assert all(moved[n] == 0.0 for n in moved if "attn_adapter" in n)  # every A_attn tensor, decayed ones too


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_trainer_logs_each_groups_lr(tmp_path):
    """pipeline/train.py on one rank (ZeRO-2, fp32, 2 steps): the start line gives the peak lr per group and
    metrics.jsonl logs lr/<group> beside the base lr at every step."""
    from shards.demo import DemoConfig, build_demo

    build_demo(DemoConfig(n_train=16, n_val=4, seed=0), tmp_path / "data", max_samples=16)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"llm_path": "tiny", "vpg_path": "tiny", "options": {"rank": 4}},
        "data": {"max_length": 160, "num_workers": 0, "shuffle_buffer": 4, "sqa_format": "QCM-A"},
        "stages": [
            {
                "stage": 2,
                "task": "scienceqa",
                "train_shards": [str(tmp_path / "data" / "train-index.json")],
                "max_steps": 2,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "warmup_steps": 0,
            }
        ],
        "optim": {"lr_scale": {"A_t": 0.5, "projection": 2}},
        "log": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        "eval": {"enabled": False, "text_retention": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT="29517", DS_ACCELERATOR="cpu", PILL_TINY_DIR=str(tmp_path / "tiny"))
    r = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(tmp_path / "c.yaml")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "peak lr per group: base 1.000e-03 (x1), A_t 5.000e-04 (x0.5), projection P 2.000e-03 (x2)" in (
        r.stdout + r.stderr
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["lr/A_t"] == pytest.approx(0.5 * row["lr"]) and row["lr/projection P"] == pytest.approx(
            2 * row["lr"]
        )
        assert row["lr/base"] == pytest.approx(row["lr"])
