"""The registry of methods: `model.method` in a training config names one of these.

Each entry says how to build the method on a frozen LLM from local paths, which config dataclass it takes, and
which visual front end it reads ("blip2": BLIP-2 ViT + Q-former, pipeline.model.vpg; "clip": CLIP ViT-L/14).
PILL is one entry among its peers; the trainer, the export and the evaluation only see `MethodSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.model.base import FrozenLLMMethod


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    """A dataclass with `stage`, `to_dict()`, `from_dict(d)` (unknown keys are an error)."""
    loader: Callable[..., FrozenLLMMethod]
    """(llm_path, vision_path, cfg, *, dtype, adapter_path, device) -> model"""
    front_end: str
    stages: tuple[int, ...] = (1, 2)
    """Stages the method has (one-stage methods train in stage 2 only)."""

    def load(self, llm_path: Any, vision_path: Any, cfg: Any = None, **kwargs: Any) -> FrozenLLMMethod:
        return self.loader(llm_path, vision_path, cfg if cfg is not None else self.config_cls(), **kwargs)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _register_builtin()
    if name not in METHODS:
        raise ValueError(f"model.method={name!r} is not a method; known: {sorted(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    _register_builtin()
    return sorted(METHODS)


def _register_builtin() -> None:
    if METHODS:
        return
    from pipeline.model.config import PILLConfig
    from pipeline.model.load import load_pill

    def pill_loader(llm_path, vision_path, cfg, **kw):
        return load_pill(llm_path, vision_path, cfg, **kw)

    register(MethodSpec("pill", PILLConfig, pill_loader, front_end="blip2"))

    from pipeline.model.peers import register_peers

    register_peers()
