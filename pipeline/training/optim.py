"""Optimizer and lr schedule: AdamW over trainable parameters only, linear warmup then cosine decay.

ZeRO-1/2 flatten each parameter group and index its first parameter, so an empty group crashes deep inside
DeepSpeed; `param_groups` drops empty groups. Frozen parameters never reach the optimizer: they would cost
two fp32 moments each (the whole LLM) and ZeRO would partition and checkpoint them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from pipeline.training.config import OptimConfig


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim: OptimConfig) -> list[dict]:
    """Two groups (decay / no decay), trainable parameters only, never an empty group."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or any(pat in lowered for pat in optim.no_decay_patterns):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": optim.weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    if not groups:
        raise ValueError("no trainable parameters: did model.set_stage() run?")
    return groups


def build_optimizer(groups: list[dict], lr: float, optim: OptimConfig, cpu_offload: bool) -> torch.optim.Optimizer:
    """torch AdamW normally; DeepSpeedCPUAdam when ZeRO offloads the optimizer (DeepSpeed requires it)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cpu_offload:
        return DeepSpeedCPUAdam(clean, lr=lr, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    fused = bool(clean[0]["params"][0].is_cuda)
    return torch.optim.AdamW(clean, lr=lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """lr multiplier at optimizer step `step` (0-based): linear warmup to 1, cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, min_lr_ratio)
    )
