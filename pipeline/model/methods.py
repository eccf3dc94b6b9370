"""The table of methods: `model.method` in a training config names one of these.

Each method file (pipeline.model.pill and each of pipeline.model.peers) exports its `SPEC`
(pipeline.model.base.MethodSpec: config class, loader, meta-device builder, front end, published count); this
module lists them and is what the trainer, pipeline.params, the export and the evaluation go through. A new
method is one file plus one entry in `METHODS` (docs/peers.md "Adding a method"); `register` adds one at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.model import pill
from pipeline.model.base import FrozenLLMMethod, MethodSpec, read_export_meta
from pipeline.model.clip import CLIPFeatures, CLIPFrontEnd
from pipeline.model.peers import SPECS as PEER_SPECS

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (pill.SPEC, *PEER_SPECS)}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method defined outside this package (a plug-in, a test's toy method) to the table."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"model.method={name!r} is not a method; known: {sorted(METHODS)}")
    return METHODS[name]


def method_names() -> list[str]:
    return sorted(METHODS)


def load_method(
    method: str,
    llm_path: str | Path,
    vision_path: Any,
    cfg: Any = None,
    dtype: torch.dtype | None = None,
    adapter_path: str | Path | None = None,
    device: torch.device | str | None = None,
) -> FrozenLLMMethod:
    """Any method of the table by name, on the frozen LLM and front end from local sources."""
    return get_method(method).load(llm_path, vision_path, cfg, dtype=dtype, adapter_path=adapter_path, device=device)


def export_method(meta: dict[str, Any]) -> MethodSpec:
    """The method an export was written by (early exports name it only by their config key)."""
    if meta.get("method"):
        return get_method(meta["method"])
    for spec in METHODS.values():
        if meta["config_key"] == spec.model_cls.config_key:
            return spec
    raise ValueError(
        f"adapter export without a method and with config key {meta['config_key']!r}: no method "
        f"of {sorted(METHODS)} writes that key"
    )


def load_export(
    export_dir: str | Path,
    llm_path: str | Path,
    vision_path: Any = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **config_overrides: Any,
) -> FrozenLLMMethod:
    """The model an export was trained as (its method and config from adapter_config.json), with its weights."""
    meta = read_export_meta(export_dir)
    spec = export_method(meta)
    cfg = spec.config_cls.from_dict({**meta["config"], **config_overrides})
    return spec.load(llm_path, vision_path, cfg, dtype=dtype, adapter_path=export_dir, device=device)


def feature_spec(spec: str, front_end: CLIPFrontEnd) -> str:
    """`shards.encode --clip-features`: "method:<name>" -> the cls:/patch: spec that method's default config
    reads on this CLIP front end; a cls:/patch: spec unchanged."""
    if not spec.startswith("method:"):
        return spec
    name = spec.split(":", 1)[1]
    method = METHODS.get(name)
    if method is None or method.front_end != "clip":
        clip_methods = sorted(n for n, s in METHODS.items() if s.front_end == "clip")
        raise ValueError(f"--clip-features {spec}: no CLIP method {name!r}; known: {clip_methods}")
    cfg = method.config_cls()
    cfg.take_front_end_shape(front_end)
    if hasattr(cfg, "clip_layers"):
        return "cls:" + ",".join(map(str, cfg.clip_layers))
    return f"patch:{cfg.vision_layer}"


def clip_features(front_end: CLIPFrontEnd, spec: str) -> CLIPFeatures:
    """The precomputed-feature extractor of `spec` (cls:, patch: or method:<name>) on a CLIP front end."""
    return CLIPFeatures(front_end, feature_spec(spec, front_end))
