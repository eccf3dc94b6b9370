"""The consolidated trainable state round-trips through a fresh DeepSpeed engine exactly (params, moments, step).

This is what a resume at another world size relies on; here both engines run in one process (a gloo world of
one), so the check is exact: after the restore, one more identical step gives identical weights.
"""

from __future__ import annotations

import pytest
import torch


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.adapter = torch.nn.Linear(8, 8, bias=False)
        self.gate = torch.nn.Linear(8, 1, bias=False)  # second (no-decay) param group

    def forward(self, x):
        return (self.gate(torch.relu(self.adapter(self.frozen(x)))) ** 2).mean()


def _engine(zero_stage: int, bf16: bool):
    import deepspeed

    from pipeline.training.config import OptimConfig
    from pipeline.training.optim import build_optimizer, build_scheduler, param_groups

    m = _Toy()
    groups = param_groups(m.named_parameters(), OptimConfig())
    opt = build_optimizer(groups, 1e-2, OptimConfig(), cpu_offload=False)
    sched = build_scheduler(opt, 10, 2, 0.0)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine, [(n, p) for n, p in m.named_parameters() if p.requires_grad]


def _step(engine, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=g).to(next(engine.module.adapter.parameters()).dtype)
    loss = engine(x)
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("zero_stage,bf16", [(2, True), (1, False)])
def test_consolidated_roundtrip_into_a_fresh_engine(dist_world_of_one, zero_stage, bf16):
    from pipeline.training.checkpoint import gather_consolidated, restore_consolidated

    a, ta = _engine(zero_stage, bf16)
    for s in range(3):
        _step(a, s)
    state = gather_consolidated(a, ta)
    assert state["optimizer_step"] == 3
    assert all(set(m) == {"exp_avg", "exp_avg_sq"} for m in state["moments"].values())
    assert state["moments"]["gate.weight"]["exp_avg"].abs().sum() > 0  # the second group is gathered too

    b, tb = _engine(zero_stage, bf16)
    restore_consolidated(b, tb, state)
    b.lr_scheduler.load_state_dict(a.lr_scheduler.state_dict())
    for g, lr in zip(b.optimizer.param_groups, b.lr_scheduler.get_last_lr()):
        g["lr"] = lr
    again = gather_consolidated(b, tb)
    for n in state["params"]:
        assert torch.equal(again["params"][n], state["params"][n]), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again["moments"][n][k], state["moments"][n][k]), (n, k)

    _step(a, 99)
    _step(b, 99)
    after_a, after_b = gather_consolidated(a, ta), gather_consolidated(b, tb)
    assert after_b["optimizer_step"] == 4
    for n in state["params"]:
        assert torch.equal(after_a["params"][n], after_b["params"][n]), n


def test_a_crash_during_save_leaves_latest_on_the_previous_checkpoint(dist_world_of_one, tmp_path, monkeypatch):
    from pipeline.training import checkpoint as ck

    engine, trainables = _engine(2, True)
    _step(engine, 0)
    mgr = ck.CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    good = mgr.save(engine, trainables, 1, {"train_state": {}}, {"data": {}})
    assert mgr.latest() == good and (good / "meta.json").is_file()
    _step(engine, 1)

    real_save = torch.save

    def crash_on_consolidated(obj, f, *a, **k):
        if str(f).endswith("consolidated.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", crash_on_consolidated)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(engine, trainables, 2, {"train_state": {}}, {"data": {}})
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert mgr.latest() == good  # the pointer never moved to the broken step_2
    assert (tmp_path / "checkpoints" / "step_00000002.partial").is_dir()
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()

    third = mgr.save(engine, trainables, 3, {"train_state": {}}, {"data": {}})
    assert mgr.latest() == third
    assert not list((tmp_path / "checkpoints").glob("*.partial"))  # leftovers cleaned by the next save
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    assert mgr.latest() == third  # a dangling pointer falls back to the newest complete checkpoint (issue 28)
