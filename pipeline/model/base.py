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

import contextlib
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from pipeline.model.attention import ATTN_BACKEND_CHOICES
from pipeline.model.batch import Batch

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
    group_of: Callable[[str], str] | None = None
    """Row name of a trainable parameter in pipeline.params' table (None: its first name component)."""
    layer_memory_model: bool = False
    """pipeline.memory's activation model covers this method's layers (pipeline.params --memory)."""

    def load(
        self,
        llm_path: Any,
        vision_path: Any,
        cfg: Any = None,
        *,
        dtype: torch.dtype | None = None,
        adapter_path: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> FrozenLLMMethod:
        cfg = cfg if cfg is not None else self.config_cls()
        return self.loader(llm_path, vision_path, cfg, dtype=dtype, adapter_path=adapter_path, device=device)

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
    """A method's forward output: final-normed hidden states, not logits (the loss lives in the trainer,
    pipeline.training.loss; `FrozenLLMMethod.logits` is the head). A transformers ModelOutput (an ordered dict),
    so DeepSpeed ZeRO-3's hooks see the tensors inside."""

    hidden: torch.Tensor | None = None
    """(B, T, D) after the method's final norm: the input of its LM head."""
    kv_cache: Any = None
    """The cache to pass back as `forward(..., cache=)` (with use_cache); its layout is the method's own."""
    gate_abs: torch.Tensor | None = None
    """(n_layers,) mean |gate| over visual tokens and heads, detached; None for methods without a gate."""
    head_index: torch.Tensor | None = None
    """(B,) int64: which of the method's heads each row's logits come from (`FrozenLLMMethod.logits`); None: the
    LLM's own head for every row. IAA: 1 = its multimodal head for rows with an image."""


class FrozenLLMMethod(nn.Module):
    """Base of every method. What a method provides, in one place:

    - `method`: its name in the table (pipeline.model.methods);
    - `__init__(llm, cfg, vpg=None, tokenizer=None)`: `self.llm` frozen, `self.cfg` its MethodConfig, `self.vpg`
      its frozen visual front end (None with precomputed features); call `super().__init__` after
      `cfg.take_front_end_shape(vpg)`;
    - `is_trainable(name, stage)`: the one predicate behind requires_grad and the export;
    - `forward(batch: Batch, *, cache=None, use_cache=False) -> MethodOutput`: the final-normed hidden states
      (B, T, D); no keyword catch-all, so a misspelt control is a TypeError (and Batch's fields are fixed);
    - `logits(hidden, head_index=None)`: the head that turns hidden states into logits (this default: the LLM's
      lm_head; a method with heads of its own, IAA, overrides it); training (pipeline.training.loss),
      generation and evaluation all go through it;
    - `adapters_off()`: a context manager under which forward computes the frozen LLM alone (text-only logits
      equal transformers' forward of the LLM); the method's forward reads `self.adapters_enabled` and sets
      `supports_adapters_off = True`;
    - `checkpoint_layers()`: the per-layer modules activation checkpointing wraps (pipeline.training.
      checkpointing): by default its `steps` (pipeline.model.seq.LayerStep per layer), else its `blocks`.
    """

    method: ClassVar[str] = ""
    config_key: ClassVar[str] = "method_config"
    """The key of adapter_config.json that holds the config (PILL's exports keep their historical name)."""
    supports_adapters_off: ClassVar[bool] = False
    """The forward honours `adapters_enabled` (adapters_off() refuses a method that does not say so)."""

    def __init__(self, llm: nn.Module, cfg: Any, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer
        self.adapters_enabled = True

    def forward(self, batch: Batch, *, cache: Any = None, use_cache: bool = False) -> MethodOutput:
        raise NotImplementedError(f"{type(self).__name__} must define forward(batch, *, cache=None, use_cache=False)")

    # ---- the head and the frozen LLM -----------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor, head_index: torch.Tensor | None = None) -> torch.Tensor:
        """(..., V) logits of final-normed hidden states (..., D). `head_index` (...) int64 (or None: head 0, the
        LLM's lm_head) picks each row's head: `MethodOutput.head_index` broadcast to the rows taken from hidden."""
        return self.llm.lm_head(hidden)

    def output_logits(self, out: MethodOutput) -> torch.Tensor:
        """(B, T, V) logits at every position of a forward's output (evaluation, tests; training takes the answer
        rows only, pipeline.training.loss)."""
        return self.logits(out.hidden, row_heads(out, out.hidden.shape[:2]))

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[FrozenLLMMethod]:
        """Within the block, forward computes the frozen LLM alone (images are not read: the placeholders are the
        LLM's tokens); leaving it restores the trained method."""
        if not self.supports_adapters_off:
            raise NotImplementedError(f"{type(self).__name__} does not implement adapters_off (supports_adapters_off)")
        before = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield self
        finally:
            self.adapters_enabled = before

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


def row_heads(out: MethodOutput, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`out.head_index` (B,) broadcast to `shape` (B, ...) (None stays None): the head of each position's row."""
    if out.head_index is None:
        return None
    return out.head_index.view(-1, *([1] * (len(shape) - 1))).expand(*shape)


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
