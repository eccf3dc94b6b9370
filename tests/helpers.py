"""Helpers shared by several test files."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.model.batch import Batch
from pipeline.training.loss import answer_loss

REPO = Path(__file__).resolve().parents[1]


def tiny_stage2_config(path: Path, steps: int, **stage_overrides) -> Path:
    """The smallest run of the repo's demo preset: its stage 2 alone, a few steps, no eval, no progress bar."""
    d = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    st = dict(d["stages"][-1], max_steps=steps, micro_batch_size=2, **stage_overrides)
    st.pop("eval_shards", None)
    d["stages"] = [st]
    d["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    d["log"] = {"every_steps": 1, "progress_bar": False, "tensorboard": False}
    d["eval"] = {"enabled": False}
    path.write_text(yaml.safe_dump(d))
    return path


def logits_of(model, **fields):
    """(B, T, V) logits of a method's forward on Batch(**fields) (tests' shorthand for the contract's two calls)."""
    return model.output_logits(model(Batch(**fields)))


def loss_of(model, **fields):
    """The trainer's answer loss of Batch(**fields) on its own: the mean over its answer tokens."""
    return answer_loss(model, Batch(**fields))
