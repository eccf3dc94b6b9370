"""What a run directory was trained with, and the check a rerun into it must pass (issue 28, item 3).

`<run dir>/config.json` is written once, by the first run that trains there; it is the record of what was trained
and is never overwritten while the run dir holds training state (a checkpoint or a finished stage). A rerun
compares its resolved config with it field by field:

- shape or method (model.method, the frozen models, adapter sizes, the stages' list): exit 2 naming the fields;
  the checkpoint would not load, or would load into something else;
- semantics (data, task, routing, prompt format, lr, optimizer, seed, precision, ...): exit 2 naming them, unless
  `--resume-changed` is given; then each change is appended to `config_history.jsonl` with the checkpoint step
  of every stage it applies from;
- a stage that already finished (its result.json is there) with any change of its definition: exit 2 whatever the
  flag (its result stands; training it again is a new run dir, stages[i].init_from its export);
- the run's length (max_steps / epochs of an unfinished stage) and what does not touch the trained weights
  (output dir, logging, checkpoint cadence, evaluation, preparation, kernels' backends): accepted, the length
  change recorded in the history.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from pipeline.training.config import ConfigError, TrainConfig

IGNORED = re.compile(
    r"^(name|output_dir|log\..*|eval\..*|prepare\..*|prepare|checkpoint\..*|data\.num_workers"
    r"|data\.log_skips|model\.options\.\w*_backend|model\.options\.\w*init_std|stages\.\d+\.eval_shards)$"
)
LENGTH = re.compile(r"^stages\.\d+\.(max_steps|epochs)$")
SHAPE = re.compile(
    r"^(model\.method|model\.llm_path|model\.vpg_path|stages|stages\.\d+\.stage"
    r"|model\.options\.(rank|adapter_act|momae|mag|attn_adapter|ffn_adapter|num_query_tokens|vpg_width|vision_width"
    r"|prompt_len|adapter_layers|clip_adapters|clip_layers|groups|insert_after|projection_hidden|vision_layer))$"
)
HISTORY = "config_history.jsonl"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists of mappings (stages) by index, the list's length under its own key."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {prefix: len(d)}
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: d}


def as_json(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def trained_state(run_dir: Path, stage_dirs: list[Path]) -> dict[int, str]:
    """{stage index: "finished" | checkpoint tag} for every stage that holds training state."""
    out = {}
    for i, d in enumerate(stage_dirs):
        if (d / "result.json").is_file():
            out[i] = "finished"
        elif (d / "checkpoints" / "latest").is_file() or list((d / "checkpoints").glob("step_*")):
            ptr = d / "checkpoints" / "latest"
            out[i] = ptr.read_text().strip() if ptr.is_file() else "checkpoints"
    return out


def _fmt(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())


def check_rerun(cfg: TrainConfig, stage_dirs: list[Path], allow_changed: bool) -> dict[str, Any] | None:
    """Compare `cfg` with the run dir's config.json. Returns the history record to append (None: nothing changed
    or nothing trained yet); raises ConfigError for a change the rerun may not make."""
    run_dir = Path(cfg.output_dir)
    record = run_dir / "config.json"
    state = trained_state(run_dir, stage_dirs)
    if not record.is_file() or not state or cfg.checkpoint.resume == "never":
        return None
    changes = {k: v for k, v in changed_fields(json.loads(record.read_text()), as_json(cfg)).items()}
    changes = {k: v for k, v in changes.items() if not IGNORED.match(k)}
    if not changes:
        return None
    where = f"{record} (written by the first run in this directory)"
    shape = {k: v for k, v in changes.items() if SHAPE.match(k)}
    if shape:
        raise ConfigError(
            f"this run dir was trained with another model shape or method: {_fmt(shape)} differ from {where}. "
            "Its checkpoints cannot continue under this config: use a new --output-dir"
        )
    finished = {
        k: v for k, v in changes.items() if k.startswith("stages.") and state.get(int(k.split(".")[1])) == "finished"
    }
    if finished:
        raise ConfigError(
            f"stage(s) already finished in {run_dir} would change: {_fmt(finished)} (vs {where}); a finished "
            "stage is not trained again: use a new --output-dir (stages[i].init_from=<its export> to start from it)"
        )
    semantic = {k: v for k, v in changes.items() if not LENGTH.match(k)}
    if semantic and not allow_changed:
        raise ConfigError(
            f"resuming {run_dir} with a different config: {_fmt(semantic)} (vs {where}). Pass --resume-changed to "
            f"continue with these changes (recorded in {run_dir / HISTORY}), or use a new --output-dir"
        )
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from": {str(stage_dirs[i]): tag for i, tag in state.items()},
        "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()},
    }


def write_record(cfg: TrainConfig, history: dict[str, Any] | None) -> None:
    """Rank 0: config.json if this run dir has none (or nothing trained yet), the history line of a rerun."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "config.json"
    if history is not None:
        with open(run_dir / HISTORY, "a") as f:
            f.write(json.dumps(history, default=str) + "\n")
    elif not record.is_file() or not _has_state(run_dir):
        record.write_text(json.dumps(as_json(cfg), indent=2))


def _has_state(run_dir: Path) -> bool:
    return any(run_dir.rglob("result.json")) or any(run_dir.rglob("checkpoints/latest"))
