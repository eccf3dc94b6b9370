"""Write the YAMLs of README "Keeping the LLM: the measured recipes": configs/demo_smollm2.yaml with stage 2 changed
per recipe, each into its own output dir, for `deepspeed --num_gpus 2 pipeline/train.py --ds_config
ds_configs/zero2.json --config OUT/<recipe>.yaml`.

    python scripts/smollm2_recipes.py --out runs/recipes --replay shards/replay/replay-index.json

The replay index comes from `python -m shards.replay --llm smollm2 ...` (README). Two kinds of rows:
- curve rows (2026-12-04/06) start from the preset minus its `optim.lr_scale`, so "none" is the run with all
  trainables at the stage lr; they probe retention during training (`eval.retention_every`, the curve) and score
  by generation, as they were measured;
- timed rows (2026-12-06, "t_" names) start from the preset as shipped (no probe, logits scoring: what the
  preset's own wall time counts) and change one knob of its training.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

PRESET = Path(__file__).resolve().parent.parent / "pipeline" / "configs" / "demo_smollm2.yaml"
FROZEN_TEXT_PATH = {"A_t": 0, "A_attn": 0}


def with_replay(cfg: dict[str, Any], replay: str, sqa_weight: int, replay_weight: int) -> dict[str, Any]:
    """Stage 2 as two sources: the preset's ScienceQA shards and the text-only replay rows (task chat)."""
    stage = cfg["stages"][1]
    shards = stage.pop("train_shards")
    stage["sources"] = [
        {"name": "sqa", "shards": shards, "weight": sqa_weight},
        {"name": "replay", "shards": [replay], "weight": replay_weight, "task": "chat"},
    ]
    return cfg


def recipes(base: dict[str, Any], replay: str) -> dict[str, dict[str, Any]]:
    def variant(**optim: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(base)
        cfg["optim"].update(optim)
        return cfg

    def longer(cfg: dict[str, Any], steps: int) -> dict[str, Any]:
        cfg["stages"][1]["max_steps"] = steps  # the same lr schedule, stretched over more steps
        return cfg

    kl_rows = {"text_kl": {"weight": 1.0, "where": "text_rows"}}
    kl_all = {"text_kl": {"weight": 1.0, "where": "all_text"}}
    out = {
        "none": variant(),
        "lrscale0": variant(lr_scale=FROZEN_TEXT_PATH),
        "lrscale0_steps300": longer(variant(lr_scale=FROZEN_TEXT_PATH), 300),
        "lrscale01": variant(lr_scale={"A_t": 0.1, "A_attn": 0.1}),
        "kl_all": {**variant(), "loss": kl_all},
        "replay_1of8": with_replay(variant(), replay, 7, 1),
        "replay_1of4": with_replay(variant(), replay, 3, 1),
        "replay_1of4_kl": {**with_replay(variant(), replay, 3, 1), "loss": kl_rows},
    }
    return out


def timed_recipes(preset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def variant(stage1_steps: int | None = None, stage2_steps: int | None = None, stage2_lr: float | None = None,
                **lr_scale: float) -> dict[str, Any]:  # fmt: skip
        cfg = copy.deepcopy(preset)
        s1, s2 = cfg["stages"]
        s1["max_steps"] = stage1_steps or s1["max_steps"]
        s2["max_steps"] = stage2_steps or s2["max_steps"]
        s2["lr"] = stage2_lr or s2["lr"]
        cfg["optim"]["lr_scale"] = {**cfg["optim"]["lr_scale"], **lr_scale}
        return cfg

    return {
        "t_preset": variant(),
        "t_stage1_100": variant(stage1_steps=100, stage2_steps=150),  # captions are half as long: cheaper samples
        "t_projection3": variant(projection=3),
        "t_lr5e3": variant(stage2_lr=5e-3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the YAMLs and (under runs/) the run dirs go")
    p.add_argument("--replay", required=True, help="the replay shards' index (python -m shards.replay)")
    p.add_argument("--retention-every", type=int, default=25)
    a = p.parse_args(argv)
    preset = yaml.safe_load(PRESET.read_text())
    base = copy.deepcopy(preset)
    base["optim"].pop("lr_scale", None)
    base["eval"].update(retention_every=a.retention_every, mode="generate")
    a.out.mkdir(parents=True, exist_ok=True)
    for name, cfg in {**recipes(base, a.replay), **timed_recipes(preset)}.items():
        cfg["name"] = f"recipe_{name}"
        cfg["output_dir"] = str(a.out / "runs" / name)
        (a.out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(a.out / f"{name}.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
