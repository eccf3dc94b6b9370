"""scripts/smollm2_recipes.py writes the README's recipe table configs: each loads as a TrainConfig and differs
from the preset only in stage 2's knob."""

import sys
from pathlib import Path

from pipeline.training.config import load_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import smollm2_recipes  # noqa: E402


def test_each_recipe_loads_and_changes_only_its_knob(tmp_path):
    replay = str(tmp_path / "replay-index.json")
    assert smollm2_recipes.main(["--out", str(tmp_path), "--replay", replay]) == 0
    cfgs = {p.stem: load_config(p) for p in tmp_path.glob("*.yaml")}
    assert set(cfgs) == {
        "none", "lrscale0", "lrscale0_steps300", "lrscale01", "kl_all", "replay_1of8", "replay_1of4", "replay_1of4_kl",
        "t_preset", "t_stage1_100", "t_projection3", "t_lr5e3",
    }  # fmt: skip
    preset = load_config(REPO / "pipeline" / "configs" / "demo_smollm2.yaml")
    timed = {n: cfgs.pop(n) for n in list(cfgs) if n.startswith("t_")}
    assert all(c.eval.retention_every == 0 and c.eval.mode == preset.eval.mode for c in timed.values())
    assert timed["t_preset"].stages == preset.stages and timed["t_preset"].optim == preset.optim
    assert [s.max_steps for s in timed["t_stage1_100"].stages] == [100, 150]
    assert timed["t_projection3"].optim.lr_scale == {"A_t": 0, "A_attn": 0, "projection": 3}
    assert timed["t_lr5e3"].stages[1].lr == 5e-3 and timed["t_lr5e3"].stages[0] == preset.stages[0]
    assert all(c.eval.mode == "generate" for c in cfgs.values())  # the curve rows as they were measured
    assert preset.optim.lr_scale == cfgs["lrscale0"].optim.lr_scale == {"A_t": 0, "A_attn": 0}  # the preset's pick
    assert cfgs["none"].optim.lr_scale == {} and cfgs["none"].loss.text_kl.weight == 0
    assert cfgs["kl_all"].loss.text_kl.where == "all_text" and cfgs["replay_1of4_kl"].loss.text_kl.weight == 1.0
    weights = {n: [(s.name, s.weight) for s in c.stages[1].sources] for n, c in cfgs.items() if "replay" in n}
    assert weights["replay_1of8"] == [("sqa", 7), ("replay", 1)]
    assert weights["replay_1of4"] == weights["replay_1of4_kl"] == [("sqa", 3), ("replay", 1)]
    longer = cfgs.pop("lrscale0_steps300")
    assert longer.stages[1].max_steps == 300 and longer.optim.lr_scale == cfgs["lrscale0"].optim.lr_scale
    assert all(c.stages[1].max_steps == preset.stages[1].max_steps for c in cfgs.values())
    assert all(c.eval.retention_every == 25 for c in cfgs.values())
