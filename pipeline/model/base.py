"""What every method (PILL and its peers) shares: its table entry, its config base, the frozen LLM, a stage's
trainable set, the export format.

A method is one file that defines a `FrozenLLMMethod` subclass, its config (a dataclass on `MethodConfig`) and
`SPEC = MethodSpec(...)`; one line in pipeline.model.methods adds it to the table (docs/peers.md "Adding a
method"). What the trainer, the export and the evaluation need beyond the method's own forward lives here, once:

- `set_stage` / `trainable_parameters`: requires_grad on exactly `is_trainable`'s set, the rest frozen;
- `save_adapter` / `load_adapter`: the trainable weights only, as `adapter_model.safetensors` (fp32) +
  `adapter_config.json` recording the method, its config and the LLM shape (format "pill-adapter-v1").
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from pipeline.model.attention import ATTN_BACKEND_CHOICES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_FORMAT = "pill-adapter-v1"
_LLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


class MethodConfig:
    """Base of every method's config dataclass: `stage`, dict/JSON round trip (an unknown key is an error naming
    it), field checks that name the field, and `take_front_end_shape` (sizes left as None, read off the front end).
    """

    stage: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {unknown}; known: {sorted(known)}")
        return cls(**d)

    def take_front_end_shape(self, front_end: Any) -> None:
        """Fill sizes left as None (visual tokens per image, feature width) from the front end (None: defaults)."""

    def _check(self, ok: bool, field_name: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field_name}={getattr(self, field_name)!r}: {why}")

    def _check_choices(self) -> None:
        """Every field typed as a Literal holds one of its values (the Literal is the one list of them)."""
        for name, tp in typing.get_type_hints(type(self)).items():
            allowed = literal_values(tp)
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be {'|'.join(map(str, allowed))}, got {getattr(self, name)!r}"
                )

    def _check_common(self, stages: tuple[int, ...], backends: tuple[str, ...] = ATTN_BACKEND_CHOICES) -> None:
        self._check_choices()
        self._check(self.stage in stages, "stage", f"this method has stage(s) {stages}")
        self._check(getattr(self, "attn_backend", "auto") in backends, "attn_backend", f"must be one of {backends}")
        nq = getattr(self, "num_query_tokens", None)
        self._check(nq is None or nq >= 1, "num_query_tokens", "must be >= 1 (or null: from the front end)")


@dataclass(frozen=True)
class MethodSpec:
    """A method's entry in the table of pipeline.model.methods (`model.method` names it)."""

    name: str
    model_cls: type[FrozenLLMMethod]
    config_cls: type
    """A dataclass on MethodConfig."""
    loader: Callable[..., FrozenLLMMethod]
    """(llm_path, vision_path, cfg, *, dtype, adapter_path, device) -> model"""
    meta_model: Callable[..., FrozenLLMMethod]
    """(llm_config, cfg) -> the method around an LLM of that config on the meta device (pipeline.params)."""
    front_end: str
    """"blip2" (BLIP-2 ViT + Q-former, pipeline.model.vpg) or "clip" (CLIP ViT, pipeline.model.clip)."""
    published: str = ""
    """The paper's trainable count and how this engine's count relates to it (pipeline.params prints it)."""
    stages: tuple[int, ...] = (1, 2)
    """Stages the method has (one-stage methods train in stage 2 only)."""
    config_section: str = "peer"
    """Where a training config holds its options: `model.<config_section>`."""
    group_of: Callable[[str], str] | None = None
    """Row name of a trainable parameter in pipeline.params' table (None: its first name component)."""
    layer_memory_model: bool = False
    """pipeline.memory's activation model covers this method's layers (pipeline.params --memory)."""

    def load(self, llm_path: Any, vision_path: Any, cfg: Any = None, **kwargs: Any) -> FrozenLLMMethod:
        return self.loader(llm_path, vision_path, cfg if cfg is not None else self.config_cls(), **kwargs)

    def row_of(self, name: str) -> str:
        return self.group_of(name) if self.group_of is not None else default_group_of(name)


def literal_values(tp: Any) -> tuple:
    """The values of a Literal type (also inside Optional[...]); () for any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(tp) for v in literal_values(a))
    return ()


def default_group_of(name: str) -> str:
    """Module group of a trainable parameter name: its first component, layer indices folded away."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name).split(".")[0]


@dataclass
class MethodOutput(ModelOutput):
    """A transformers ModelOutput (an ordered dict), so DeepSpeed ZeRO-3's hooks see the tensors inside."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    kv_cache: list | None = None
    """Per layer (k, v, value_gate) with use_cache (not `past_key_values`: transformers 5 renames that field)."""
    n_loss_tokens: torch.Tensor | None = None
    """Label positions that entered `loss` (the trainer weights micro-batches by it)."""
    gate_abs: torch.Tensor | None = None
    """(n_layers,) mean |gate| over visual tokens and heads, detached; None for methods without a gate."""

    @property
    def past_key_values(self) -> list | None:
        return self.kv_cache


class FrozenLLMMethod(nn.Module):
    """Base of every method. What a method provides, in one place:

    - `method`: its name in the table (pipeline.model.methods);
    - `__init__(llm, cfg, vpg=None, tokenizer=None)`: `self.llm` frozen, `self.cfg` its MethodConfig, `self.vpg`
      its frozen visual front end (None with precomputed features); call `super().__init__` after
      `cfg.take_front_end_shape(vpg)`;
    - `is_trainable(name, stage)`: the one predicate behind requires_grad and the export;
    - `forward(input_ids, attention_mask, modality_mask, labels, pixel_values, image_features, position_ids,
      cu_seqlens, max_seqlen, past_key_values, use_cache, num_items_in_batch, return_logits) -> MethodOutput`;
    - `checkpoint_layers()`: the per-layer modules activation checkpointing wraps (pipeline.training.
      activation_checkpointing): by default its `steps` (pipeline.model.seq.LayerStep per layer), else its `blocks`.
    """

    method: ClassVar[str] = ""
    config_key: ClassVar[str] = "method_config"
    """The key of adapter_config.json that holds the config (PILL's exports keep their historical name)."""

    def __init__(self, llm: nn.Module, cfg: Any, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer

    def is_trainable(self, name: str, stage: int) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must say which parameters each stage trains")

    def checkpoint_layers(self) -> list[nn.Module]:
        for name in ("steps", "blocks"):
            if isinstance(getattr(self, name, None), nn.ModuleList):
                return list(getattr(self, name))
        raise NotImplementedError(
            f"{type(self).__name__} has no `steps` or `blocks` ModuleList: define "
            "checkpoint_layers() (the per-layer modules activation checkpointing wraps)"
        )

    # ---- stages and parameters -----------------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        """requires_grad on exactly the stage's trainable set; everything else (the LLM, the front end) frozen."""
        self.cfg.stage = stage
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable(name, stage))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> FrozenLLMMethod:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout whatever its config says
        return self

    # ---- trainable-weights-only save / load ----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if self.is_trainable(n, self.cfg.stage)}

    def export_meta(self, keys: list[str]) -> dict[str, Any]:
        c = self.llm.config
        return {
            "format": EXPORT_FORMAT,
            "method": self.method,
            self.config_key: self.cfg.to_dict(),
            "llm": {"model_type": c.model_type, **{f: getattr(c, f) for f in _LLM_FIELDS}},
            "keys": keys,
        }

    def save_adapter(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """The stage's trainable weights (fp32) + adapter_config.json.

        `state_dict` overrides the module's own values (e.g. DeepSpeed's fp32 master weights when the module holds
        bf16 copies); its keys must be exactly the stage's trainable set."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        own = self.adapter_state_dict()
        if state_dict is not None and set(state_dict) != set(own):
            raise ValueError(
                f"save_adapter: state_dict keys differ from the stage-{self.cfg.stage} trainable set: "
                f"missing={sorted(set(own) - set(state_dict))[:5]} "
                f"extra={sorted(set(state_dict) - set(own))[:5]}"
            )
        state = {n: t.float().contiguous().cpu() for n, t in (state_dict or own).items()}
        tmp = path / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / ADAPTER_WEIGHTS)
        (path / ADAPTER_CONFIG).write_text(json.dumps(self.export_meta(sorted(state)), indent=2))
        return path

    def load_adapter(self, path: str | Path) -> dict:
        """Load weights saved by save_adapter (any stage of this method) onto this model; returns the saved meta."""
        path = Path(path)
        meta = read_export_meta(path)
        if meta["method"] != self.method and not (meta["method"] is None and meta["config_key"] == self.config_key):
            raise ValueError(f"{path / ADAPTER_CONFIG}: method={meta['method']!r} but this model is {self.method!r}")
        c = self.llm.config
        for f in _LLM_FIELDS:
            if meta["llm"][f] != getattr(c, f):
                raise ValueError(
                    f"{path / ADAPTER_CONFIG}: llm.{f}={meta['llm'][f]} but the loaded LLM has "
                    f"{getattr(c, f)}: the adapter was trained on a different LLM"
                )
        state = load_file(str(path / ADAPTER_WEIGHTS))
        own = dict(self.named_parameters())
        expected = {n for n in own if self.is_trainable(n, meta["config"]["stage"])}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path / ADAPTER_WEIGHTS}: missing={missing[:10]} unexpected={unexpected[:10]} "
                f"(was it saved with a different {self.method} config?)"
            )
        with torch.no_grad():
            for n, t in state.items():
                if tuple(t.shape) != tuple(own[n].shape):
                    raise ValueError(
                        f"{path / ADAPTER_WEIGHTS}: {n} has shape {tuple(t.shape)}, "
                        f"model expects {tuple(own[n].shape)} (different rank?)"
                    )
                own[n].copy_(t.to(own[n].dtype))
        return meta


def trainable_table(model: nn.Module, group_of) -> tuple[list[tuple[str, int, int]], int]:
    """[(group, trainable, total)] over the method's own parameters (not the frozen LLM / front end), and the
    trainable total; `group_of(name)` names each parameter's row."""
    trainable: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith(("llm.", "vpg.")):
            continue
        g = group_of(name)
        total[g] = total.get(g, 0) + p.numel()
        trainable[g] = trainable.get(g, 0) + (p.numel() if p.requires_grad else 0)
    return [(g, trainable[g], total[g]) for g in sorted(total)], sum(trainable.values())


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """adapter_config.json with `method` and `config` normalised (PILL exports keep their `pill_config` key)."""
    path = Path(path)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (path / f).is_file():
            raise FileNotFoundError(f"adapter export: {path / f} does not exist")
    try:
        meta = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from e
    key = next((k for k in meta if k.endswith("_config") and isinstance(meta[k], dict)), None)
    if key is None or "stage" not in meta[key]:
        raise ValueError(
            f"{path / ADAPTER_CONFIG}: no <method>_config with a stage (not an export written by save_adapter)"
        )
    meta["config"], meta["config_key"] = meta[key], key
    meta.setdefault("method", None)  # early exports: the method is the one whose config_key this is (methods.py)
    return meta
