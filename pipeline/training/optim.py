"""Optimizer and lr schedule: AdamW over trainable parameters only, linear warmup then cosine decay, and per-module
learning rates (`optim.lr_scale`).

ZeRO-1/2 flatten each parameter group and index its first parameter, so an empty group crashes deep inside
DeepSpeed; `param_groups` drops empty groups. Frozen parameters never reach the optimizer: they would cost
two fp32 moments each (the whole LLM) and ZeRO would partition and checkpoint them.

Per-module learning rates: `optim.lr_scale: {A_t: 0.1, projection: 2}` multiplies the stage's lr (warmup and cosine
included) for the parameters of those groups. A group is a row of `python -m pipeline.params` for the method (its
MethodSpec.row_of: PILL's "A_t (text FFN expert)", a peer's "adapters"); a key is the row's full name, the part
before " (" or its first word ("A_t", "W_g", "projection"), whichever names exactly one row. Each distinct factor
gets its own decay / no-decay optimizer groups, labelled with the rows they hold; with no lr_scale the optimizer has
the two groups it always had (checkpoints stay compatible). The scheduler's lambda multiplies every group's own
initial lr, so the ratios hold at every step; AdamW's decoupled weight decay scales with the group's lr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from transformers import AutoConfig, LlamaConfig

from pipeline.model import get_method
from pipeline.model.base import trainable_table
from pipeline.model.frozen import SMOLLM2, TINY
from pipeline.model.gguf import read_gguf_config, smollm2_gguf
from pipeline.training.config import ConfigError, ModelConfig, OptimConfig, TrainConfig

BASE_LABEL = "base"
"""Label of the optimizer groups at factor 1 (every parameter no lr_scale key names)."""


def _shape_config(llm_path: str):
    """An LLM config to build the method around on the meta device: the real one when it is readable from metadata
    (a checkpoint's config.json, a .gguf header), else a tiny Llama (the group names do not depend on the size)."""
    try:
        if str(llm_path) == SMOLLM2:
            return read_gguf_config(smollm2_gguf())
        if str(llm_path).endswith(".gguf"):
            return read_gguf_config(Path(llm_path))
        if str(llm_path) != TINY and (Path(llm_path) / "config.json").is_file():
            return AutoConfig.from_pretrained(str(llm_path), local_files_only=True)
    except (OSError, ValueError, ImportError):
        pass  # check_paths names an unreadable LLM; the groups come from the fallback shape
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    )


@lru_cache(maxsize=8)
def _groups_of(method: str, options_json: str, llm_path: str) -> tuple[str, ...]:
    spec = get_method(method)
    model = spec.meta_model(_shape_config(llm_path), spec.config_cls.from_dict(json.loads(options_json)))
    rows, _ = trainable_table(model, spec.row_of)
    return tuple(g for g, _, _ in rows)


def method_groups(model_cfg: ModelConfig) -> list[str]:
    """The configured method's module groups, as `python -m pipeline.params` prints them (every group the method
    has, trained in this stage or not); built on the meta device, so nothing is allocated."""
    options = model_cfg.method_config()
    as_dict = options.to_dict() if hasattr(options, "to_dict") else dict(vars(options))
    return list(_groups_of(model_cfg.method, json.dumps(as_dict, sort_keys=True, default=str), str(model_cfg.llm_path)))


def group_aliases(group: str) -> list[str]:
    """The names a key may use for a group: the full row, the part before " (", the first word."""
    return list(dict.fromkeys([group, group.split(" (")[0], group.split()[0]]))


def resolve_lr_scale(lr_scale: dict[str, float], groups: list[str], method: str) -> dict[str, float]:
    """{group row: factor} from the config's keys; an unknown, ambiguous or repeated key is a ConfigError listing
    the method's groups."""
    names: dict[str, set[str]] = {}
    for g in groups:
        for a in group_aliases(g):
            names.setdefault(a, set()).add(g)
    listing = "; ".join(f"{g} (key: {group_aliases(g)[-1]})" for g in groups)
    out: dict[str, float] = {}
    for key, factor in lr_scale.items():
        hits = names.get(str(key), set())
        if len(hits) != 1:
            why = "names several groups" if hits else "is not a group of"
            raise ConfigError(f"optim.lr_scale: {key!r} {why} method {method}; its groups: {listing}")
        (group,) = hits
        if group in out:
            raise ConfigError(f"optim.lr_scale: two keys name the group {group!r}")
        out[group] = float(factor)
    return out


def check_lr_scale(cfg: TrainConfig) -> dict[str, float]:
    """Before launch: every optim.lr_scale key names a group of model.method (ConfigError listing them)."""
    if not cfg.optim.lr_scale:
        return {}
    return resolve_lr_scale(cfg.optim.lr_scale, method_groups(cfg.model), cfg.model.method)


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    optim: OptimConfig,
    row_of: Callable[[str], str] | None = None,
    scale: dict[str, float] | None = None,
) -> list[dict]:
    """Decay / no-decay groups of the trainable parameters, never an empty group. With `scale` ({group row: factor},
    rows from `row_of`, see `resolve_lr_scale`): one decay / no-decay pair per distinct factor, each group carrying
    `lr_scale` (its factor) and `label` (the rows it holds, or "base"), factor-1 groups first."""
    if scale and row_of is None:
        raise ValueError("param_groups: lr scales need row_of (the method's MethodSpec.row_of)")
    buckets: dict[tuple[float, bool], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        row = row_of(name) if row_of is not None else BASE_LABEL
        factor = (scale or {}).get(row, 1.0)
        lowered = name.lower()
        decay = not (p.ndim < 2 or any(pat in lowered for pat in optim.no_decay_patterns))
        b = buckets.setdefault((factor, decay), {"params": [], "names": [], "rows": set()})
        b["params"].append(p)
        b["names"].append(name)
        b["rows"].add(row if factor != 1.0 else BASE_LABEL)
    if not buckets:
        raise ValueError("no trainable parameters: did model.set_stage() run?")
    groups = []
    for (factor, decay), b in sorted(buckets.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1])):
        groups.append(
            {
                "params": b["params"],
                "weight_decay": optim.weight_decay if decay else 0.0,
                "names": b["names"],
                "lr_scale": factor,
                "label": "+".join(sorted(r.split(" (")[0] for r in b["rows"])),
            }
        )
    return groups


def build_optimizer(groups: list[dict], lr: float, optim: OptimConfig, cpu_offload: bool) -> torch.optim.Optimizer:
    """torch AdamW normally; DeepSpeedCPUAdam when ZeRO offloads the optimizer (DeepSpeed requires it)."""
    # each group's own peak lr; the scheduler's initial_lr is read from it, so every step keeps the ratios
    clean = [{**{k: v for k, v in g.items() if k != "names"}, "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
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


def lr_by_group(optimizer: torch.optim.Optimizer, base: float) -> dict[str, float]:
    """{"lr/<label>": effective lr} per group label at the stage's lr `base` (every group follows the same schedule,
    times its factor); {} when no group is scaled (the plain "lr" says it all)."""
    groups = optimizer.param_groups
    if all(g.get("lr_scale", 1.0) == 1.0 for g in groups):
        return {}
    return {f"lr/{g.get('label', BASE_LABEL)}": base * g.get("lr_scale", 1.0) for g in groups}


def base_lr(optimizer: torch.optim.Optimizer, lrs: list[float]) -> float:
    """The stage's lr at this step before any lr_scale (the "lr" metric), from the scheduler's get_last_lr()."""
    return lrs[0] / optimizer.param_groups[0].get("lr_scale", 1.0)


def describe_lrs(optimizer: torch.optim.Optimizer) -> str:
    """One line for the start of a stage: the peak lr of each group (\"\" without lr_scale)."""
    seen: dict[str, tuple[float, float]] = {}
    for g in optimizer.param_groups:
        seen.setdefault(g.get("label", BASE_LABEL), (g.get("initial_lr", g["lr"]), g.get("lr_scale", 1.0)))
    if len(seen) == 1 and next(iter(seen.values()))[1] == 1.0:
        return ""
    return "peak lr per group: " + ", ".join(f"{k} {lr:.3e} (x{f:g})" for k, (lr, f) in seen.items())
