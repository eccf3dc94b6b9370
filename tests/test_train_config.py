"""Config, DeepSpeed-config filling/validation and optimizer construction (no process group needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.training.config import ConfigError, StageConfig, TrainConfig, load_config
from pipeline.training.ds_config import fill_ds_config, load_ds_config, peak_lr, plan_batch
from pipeline.training.optim import build_scheduler, param_groups, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _stage(**kw) -> StageConfig:
    base = {"stage": 2, "train_shards": ["x.tar"], "max_steps": 10}
    base.update(kw)
    return StageConfig(**base)


@pytest.mark.parametrize("name", ["demo", "stage1_cc595k", "stage2_scienceqa", "stage2_llava665k"])
def test_shipped_presets_load_and_fill_every_ds_config(name):
    from pipeline.train import resolve_auto_precision

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    resolve_auto_precision(cfg, rank=1)  # as pipeline/train.py does before launch (`precision: auto` in the demo)
    for ds in ("zero1", "zero2", "zero3", "zero2_offload"):
        raw = load_ds_config(REPO / "ds_configs" / f"{ds}.json")
        for s in cfg.stages:
            plan = plan_batch(s, 8 if s.global_batch_size else 2)
            d = fill_ds_config(raw, cfg, s, plan, CPU, hidden_size=64)
            assert (
                d["train_batch_size"]
                == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * plan.world_size
            )
            assert "auto" not in json.dumps(d)


def test_spec_hyperparameters_in_presets():
    sqa = load_config(REPO / "configs" / "stage2_scienceqa.yaml")
    s = sqa.stages[0]
    assert (s.stage, s.epochs, s.micro_batch_size, s.grad_accum, s.base_lr) == (2, 20, 4, 8, 2e-3)
    assert sqa.data.max_length == 512 and sqa.optim.betas == (0.9, 0.95) and sqa.optim.weight_decay == 0.02
    # lr scaling rule: base_lr x effective batch / 256 (8 GPUs x 4 x 8 = 256 -> exactly base_lr)
    assert peak_lr(s, plan_batch(s, 8)) == pytest.approx(2e-3)
    assert peak_lr(s, plan_batch(s, 1)) == pytest.approx(2e-3 * 32 / 256)
    st1 = load_config(REPO / "configs" / "stage1_cc595k.yaml").stages[0]
    assert (st1.stage, st1.epochs, st1.base_lr) == (1, 3, 1e-3)


def test_set_overrides_dotted_and_star(tmp_path):
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["stages.*.max_steps=3", "stages.1.lr=0.5", "seed=7", "optim.betas=[0.8, 0.9]"]
    )
    assert [s.max_steps for s in cfg.stages] == [3, 3]
    assert cfg.stages[1].lr == 0.5 and cfg.seed == 7 and cfg.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["stages.0.max_stepz=3"], "max_stepz"),
        (["stages.0.max_steps=null"], "epochs / max_steps"),  # neither (setting one replaces the other)
        (["stages.0.micro_batch_size=0"], "micro_batch_size"),
        (["stages.0.train_shards=[]"], "train_shards"),
        (["precision=fp16"], "precision"),
        (["stages.0.stage=3"], "stage"),
        (["stages.0.train_weights=[1, 2]"], "train_weights"),
        (["log.every_steps=zero"], "log.every_steps"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("*", r"\*")):
        load_config(REPO / "configs" / "demo.yaml", overrides)


def test_batch_arithmetic_error_is_clear():
    s = _stage(micro_batch_size=4, global_batch_size=100)
    with pytest.raises(ConfigError, match=r"global_batch_size=100 is not divisible .* 4 x 2 = 8"):
        plan_batch(s, 2, "stages[0]")
    assert plan_batch(_stage(micro_batch_size=4, global_batch_size=64), 2).grad_accum == 8


def test_ds_config_contradictions_and_leftovers():
    cfg = TrainConfig(stages=[_stage()])
    s = cfg.stages[0]
    plan = plan_batch(s, 2)
    raw = load_ds_config(REPO / "ds_configs" / "zero2.json")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 contradicts"):
        fill_ds_config({**raw, "train_micro_batch_size_per_gpu": 16}, cfg, s, plan, CPU)
    with pytest.raises(ConfigError, match='"optimizer" section'):
        fill_ds_config({**raw, "optimizer": {"type": "AdamW"}}, cfg, s, plan, CPU)
    with pytest.raises(ConfigError, match="fp16"):
        fill_ds_config({**raw, "fp16": {"enabled": True}}, cfg, s, plan, CPU)
    with pytest.raises(ConfigError, match="wall_clock"):
        fill_ds_config({**raw, "wall_clock_breakdown": "auto"}, cfg, s, plan, CPU)
    with pytest.raises(ConfigError, match="bf16.enabled=False contradicts"):
        fill_ds_config({**raw, "bf16": {"enabled": False}}, cfg, s, plan, CPU)
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_config("ds_configs/nope.json")
    d = fill_ds_config(raw, cfg, s, plan, CPU)
    assert d["gradient_clipping"] == 1.0 and d["bf16"]["enabled"] is True


def test_bf16_on_device_without_it(monkeypatch):
    import pipeline.training.ds_config as dsc

    monkeypatch.setattr(dsc, "bf16_supported", lambda device: False)
    cfg = TrainConfig(stages=[_stage()])
    raw = load_ds_config(REPO / "ds_configs" / "zero2.json")
    with pytest.raises(ConfigError, match="no bf16 support"):
        fill_ds_config(raw, cfg, cfg.stages[0], plan_batch(cfg.stages[0], 1), torch.device("cuda"))


def test_main_reports_config_error_before_launch(capsys):
    from pipeline.train import main

    rc = main(["--set", "stages.0.micro_batch_size=3", "--set", "stages.0.global_batch_size=10"])
    assert rc == 2
    assert "stages[0].global_batch_size=10 is not divisible" in capsys.readouterr().err


def test_missing_inputs_are_named_before_launch(capsys, tmp_path, tiny_dirs):
    """A real job's missing LLM, VPG, stage-1 export or shards fail with the field's name, exit 2, no launch."""
    from pipeline.train import main

    base = ["--config", "configs/stage2_scienceqa.yaml"]
    llm, vpg = ["--set", f"model.llm_path={tiny_dirs['llm']}"], ["--set", f"model.vpg_path={tiny_dirs['vpg']}"]
    cases = [
        (base, "model.llm_path='checkpoints/llama-2-7b-chat-hf': no config.json"),
        (base + llm + ["--set", f"model.vpg_path={tmp_path / 'nope'}"], "model.vpg_path="),
        (base + llm + vpg, "stages[0].init_from='runs/stage1_cc595k/export'"),
        (
            base
            + llm
            + vpg
            + [
                "--set",
                "stages.0.init_from=null",
                "--set",
                f"stages.0.train_shards=['{tmp_path}/sqa-{{000000..000003}}.tar']",
            ],
            "stages[0].train_shards: source stages[0].train_shards: none of its 4 shard(s) exist",
        ),
    ]
    cases.append((base + ["--set", "stages.0.train_shards=[a-{0..3}.tar]"], "--set stages.0.train_shards: the value"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, message


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.adapter = torch.nn.Linear(4, 4, bias=False)
        self.gate = torch.nn.Linear(4, 2, bias=False)
        self.norm = torch.nn.LayerNorm(4)


def test_param_groups_only_trainable_and_never_empty():
    from pipeline.training.config import OptimConfig

    m = _Toy()
    groups = param_groups(m.named_parameters(), OptimConfig())
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}
    assert all(g["params"] for g in groups)
    by_wd = {g["weight_decay"]: g["names"] for g in groups}
    assert by_wd[0.02] == ["adapter.weight"]
    assert sorted(by_wd[0.0]) == ["gate.weight", "norm.bias", "norm.weight"]
    # only decayed parameters -> a single group, not an empty second one
    m.gate.requires_grad_(False)
    m.norm.requires_grad_(False)
    groups = param_groups(m.named_parameters(), OptimConfig())
    assert len(groups) == 1 and groups[0]["names"] == ["adapter.weight"]
    m.adapter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m.named_parameters(), OptimConfig())


def test_param_groups_on_the_real_pill(tmp_path):
    from pipeline.model import PILLConfig, load_pill
    from pipeline.model.tiny import build_tiny_pill_dirs
    from pipeline.training.config import OptimConfig

    dirs = build_tiny_pill_dirs(tmp_path)
    for stage in (1, 2):
        model = load_pill(dirs["llm"], dirs["vpg"], PILLConfig(stage=stage, vpg_width=64, num_query_tokens=8))
        groups = param_groups(model.named_parameters(), OptimConfig())
        names = [n for g in groups for n in g["names"]]
        assert sorted(names) == sorted(n for n, _ in model.trainable_parameters())
        assert not any(n.startswith(("llm.", "vpg.")) for n in names)
        assert all(g["params"] for g in groups)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, 20, 4, 0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01 + 0 * math.pi


# ----------------------------------------------------------------------------------------------------------------
# One place for a method's options: model.options, typed by the selected method's config class.


def _model_dict(method: str, **extra) -> dict:
    return {"model": {"method": method, **extra}, "stages": [{"stage": 2, "train_shards": ["x.tar"], "max_steps": 1}]}


@pytest.mark.parametrize("method", ["pill", "llama_adapter", "lavin", "excitor", "iaa"])
def test_every_method_reads_its_options_from_model_options(method):
    from pipeline.model import get_method

    spec = get_method(method)
    cfg = load_config(None, ["model.options.attn_backend=sdpa"], base=_model_dict(method))
    assert type(cfg.model.options) is spec.config_cls
    assert cfg.model.method_config() is cfg.model.options
    assert cfg.model.options.attn_backend == "sdpa"
    assert not hasattr(cfg.model, "pill") and not hasattr(cfg.model, "peer")
    with pytest.raises(ConfigError, match=r"model\.options: unknown key\(s\) \['rnak'\].*model.method=" + method):
        load_config(None, ["model.options.rnak=16"], base=_model_dict(method))


@pytest.mark.parametrize(
    "base, overrides, old",
    [
        (_model_dict("pill", pill={"rank": 8}), [], "model.pill"),
        (_model_dict("lavin", peer={"rank": 8}), [], "model.peer"),
        (_model_dict("pill"), ["model.pill.rank=8"], "model.pill"),
        (_model_dict("iaa"), ["model.peer={attn_backend: sdpa}"], "model.peer"),
    ],
)
def test_old_method_option_keys_name_model_options(base, overrides, old):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, base=base)
    assert f"{old} is now model.options" in str(e.value)


def test_old_method_option_key_in_a_yaml_file_is_named(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text((REPO / "configs" / "demo.yaml").read_text().replace("  options:", "  pill:"))
    assert "  pill:" in p.read_text()
    with pytest.raises(ConfigError, match=r"model\.pill is now model\.options"):
        load_config(p)


def test_no_shipped_preset_uses_an_old_method_option_key():
    for p in sorted((REPO / "pipeline" / "configs").glob("*.yaml")):
        model = yaml.safe_load(p.read_text()).get("model", {})
        assert not {"pill", "peer"} & set(model), p.name
        load_config(p)
