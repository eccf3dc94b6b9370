"""DeepSpeed config: fill the "auto" values from TrainConfig and validate the combination before any work.

The JSON files in ds_configs/ hold "auto" (as LLaVA's configs do) for every number that train.py owns:
micro-batch, accumulation, global batch, clipping, bf16. `fill_ds_config` writes them from the stage config so
the two never disagree; an explicit number in the JSON that contradicts the YAML is an error, not a silent pick.
The optimizer and scheduler are built by train.py (only trainable parameters, no-decay groups), so the JSON
must not carry "optimizer"/"scheduler" sections.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.training.config import ConfigError, StageConfig, TrainConfig


@dataclass
class BatchPlan:
    """Derived batch arithmetic of one stage at one world size (computed once, here)."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def plan_batch(stage: StageConfig, world_size: int, at: str = "stage") -> BatchPlan:
    """global_batch_size (if set) wins and derives grad_accum; it must divide evenly."""
    mb = stage.micro_batch_size
    if stage.global_batch_size is None:
        return BatchPlan(mb, stage.grad_accum, world_size)
    per_step = mb * world_size
    if stage.global_batch_size % per_step:
        raise ConfigError(
            f"{at}.global_batch_size={stage.global_batch_size} is not divisible by micro_batch_size x world_size "
            f"= {mb} x {world_size} = {per_step}; pick a global batch that is a multiple of {per_step} "
            f"or change micro_batch_size"
        )
    return BatchPlan(mb, stage.global_batch_size // per_step, world_size)


def peak_lr(stage: StageConfig, plan: BatchPlan) -> float:
    """Spec's rule: lr = base_lr x effective_batch / 256, unless an explicit lr is given."""
    if stage.lr is not None:
        return stage.lr
    if stage.scale_lr:
        return stage.base_lr * plan.global_batch_size / 256
    return stage.base_lr


def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"--ds_config {path}: file not found (shipped: ds_configs/zero1.json, zero2.json, "
            f"zero3.json, zero2_offload.json)"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({e})") from None


def _fill(d: dict[str, Any], key: str, value: Any, at: str) -> None:
    """Replace "auto" (or absence) by `value`; an explicit different value is a contradiction."""
    cur = d.get(key, "auto")
    if cur == "auto":
        d[key] = value
    elif cur != value:
        raise ConfigError(
            f"ds_config {at}{key}={cur!r} contradicts the training config ({value!r}); set it to "
            f'"auto" in the JSON and change the YAML/--set instead (one source of truth)'
        )


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return True  # CPU: DeepSpeed's bf16 ZeRO path runs (measured on this machine kind), just not fast


def fill_ds_config(
    raw: dict[str, Any],
    cfg: TrainConfig,
    stage: StageConfig,
    plan: BatchPlan,
    device: torch.device,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """Return a complete DeepSpeed config for this stage; raise ConfigError for an impossible combination."""
    d = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in d:
            raise ConfigError(
                f'ds_config has an "{section}" section; train.py builds the {section} itself '
                f"(only trainable parameters, warmup+cosine). Remove it and set optim.* / "
                f"stages[*].lr in the YAML instead"
            )
    if d.get("fp16", {}).get("enabled") is True:
        raise ConfigError(
            "ds_config fp16.enabled=true is not supported (no loss scaling here); use bf16 (precision: bf16) or fp32"
        )
    _fill(d, "train_micro_batch_size_per_gpu", plan.micro_batch_size, "")
    _fill(d, "gradient_accumulation_steps", plan.grad_accum, "")
    _fill(d, "train_batch_size", plan.global_batch_size, "")
    _fill(d, "gradient_clipping", float(cfg.optim.grad_clip), "")
    _fill_precision(d, cfg.precision, device)
    zero = d.setdefault("zero_optimization", {"stage": 0})
    stage_n = zero.get("stage", 0)
    if stage_n not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage must be 0-3, got {stage_n!r}")
    h = hidden_size or 4096
    # Buckets of one d x d matrix; ZeRO-3 keeps at most about two decoder layers (~12 d^2 parameters each)
    # gathered at a time, so a rank's memory for frozen weights stays its partition plus two layers.
    for k, v in {
        "reduce_bucket_size": h * h,
        "allgather_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        "stage3_max_live_parameters": 24 * h * h,
        "stage3_max_reuse_distance": 24 * h * h,
    }.items():
        if zero.get(k) == "auto":
            zero[k] = v
    off = zero.get("offload_optimizer", {})
    if off and off.get("device") not in (None, "none", "cpu", "nvme"):
        raise ConfigError(f"ds_config zero_optimization.offload_optimizer.device={off.get('device')!r}: use cpu")
    if off and off.get("device") == "cpu" and device.type == "cpu":
        off["pin_memory"] = False  # nothing to pin to without a GPU
    leftover = [k for k, v in _walk(d) if v == "auto"]
    if leftover:
        raise ConfigError(
            f'ds_config: no value for "auto" field(s) {leftover}; train.py fills only '
            f"batch/accumulation/clipping/bf16/bucket sizes"
        )
    d.setdefault("steps_per_print", 10**9)
    return d


def _fill_precision(d: dict[str, Any], precision: str, device: torch.device) -> None:
    """The bf16 section from the resolved `precision` (never "auto" here), checked against what the device runs."""
    if precision not in ("bf16", "fp32"):
        raise ConfigError(
            f"precision={precision!r} reached the DeepSpeed config unresolved: pipeline/train.py resolves auto "
            "before launch (pipeline.training.precision.resolve_precision); code that builds a stage itself must too"
        )
    bf16 = d.setdefault("bf16", {})
    want_bf16 = precision == "bf16"
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = want_bf16
    elif bf16["enabled"] != want_bf16:
        raise ConfigError(f"ds_config bf16.enabled={bf16['enabled']} contradicts precision={precision!r}")
    if want_bf16 and not bf16_supported(device):
        raise ConfigError(
            f"precision=bf16 but {device} has no bf16 support (pre-Ampere GPU?); use --set precision=fp32"
        )


def uses_cpu_offload(ds: dict[str, Any]) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device") in ("cpu", "nvme")


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d
