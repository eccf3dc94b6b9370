"""What every method (PILL and its peers) shares: a frozen LLM, a stage's trainable set, the export format.

A method subclasses `FrozenLLMMethod`, sets `method` (its registry name, pipeline.model.methods) and implements
`is_trainable(name, stage)` and `forward(...) -> MethodOutput`. Everything the trainer, the export and the
evaluation need beyond that lives here, once:

- `set_stage` / `trainable_parameters`: requires_grad on exactly `is_trainable`'s set, the rest frozen;
- `save_adapter` / `load_adapter`: the trainable weights only, as `adapter_model.safetensors` (fp32) +
  `adapter_config.json` recording the method, its config and the LLM shape (format "pill-adapter-v1").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.utils import ModelOutput

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_FORMAT = "pill-adapter-v1"
_LLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


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
    """Base of every method: `self.llm` frozen, `self.cfg` a dataclass with `stage`, `to_dict`, `from_dict`."""

    method: ClassVar[str] = ""

    def __init__(self, llm: nn.Module, cfg: Any, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer

    def is_trainable(self, name: str, stage: int) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must say which parameters each stage trains")

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
        config_key = "pill_config" if self.method == "pill" else "method_config"
        return {"format": EXPORT_FORMAT, "method": self.method, config_key: self.cfg.to_dict(),
                "llm": {"model_type": c.model_type, **{f: getattr(c, f) for f in _LLM_FIELDS}}, "keys": keys}

    def save_adapter(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """The stage's trainable weights (fp32) + adapter_config.json.

        `state_dict` overrides the module's own values (e.g. DeepSpeed's fp32 master weights when the module holds
        bf16 copies); its keys must be exactly the stage's trainable set."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        own = self.adapter_state_dict()
        if state_dict is not None and set(state_dict) != set(own):
            raise ValueError(f"save_adapter: state_dict keys differ from the stage-{self.cfg.stage} trainable set: "
                             f"missing={sorted(set(own) - set(state_dict))[:5]} "
                             f"extra={sorted(set(state_dict) - set(own))[:5]}")
        state = {n: t.float().contiguous().cpu() for n, t in (state_dict or own).items()}
        tmp = path / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / ADAPTER_WEIGHTS)
        (path / ADAPTER_CONFIG).write_text(json.dumps(self.export_meta(sorted(state)), indent=2))
        return path

    def load_adapter(self, path: str | Path) -> dict:
        """Load weights saved by save_adapter (any stage of this method) onto this model; returns the saved meta."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_export_meta(path)
        if meta["method"] != self.method:
            raise ValueError(f"{path / ADAPTER_CONFIG}: method={meta['method']!r} but this model is {self.method!r}")
        c = self.llm.config
        for f in _LLM_FIELDS:
            if meta["llm"][f] != getattr(c, f):
                raise ValueError(f"{path / ADAPTER_CONFIG}: llm.{f}={meta['llm'][f]} but the loaded LLM has "
                                 f"{getattr(c, f)}: the adapter was trained on a different LLM")
        state = load_file(str(path / ADAPTER_WEIGHTS))
        own = dict(self.named_parameters())
        expected = {n for n in own if self.is_trainable(n, meta["config"]["stage"])}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: missing={missing[:10]} unexpected={unexpected[:10]} "
                             f"(was it saved with a different {self.method} config?)")
        with torch.no_grad():
            for n, t in state.items():
                if tuple(t.shape) != tuple(own[n].shape):
                    raise ValueError(f"{path / ADAPTER_WEIGHTS}: {n} has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(own[n].shape)} (different rank?)")
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
    meta.setdefault("method", "pill")
    config = meta.get("method_config", meta.get("pill_config"))
    if not isinstance(config, dict) or "stage" not in config:
        raise ValueError(f"{path / ADAPTER_CONFIG}: no method_config/pill_config with a stage (not an export "
                         "written by save_adapter)")
    meta["config"] = config
    return meta
