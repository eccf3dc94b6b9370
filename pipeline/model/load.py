"""Build a method from local directories: the frozen LLM (+ tokenizer), its visual front end, the trainables.

Model sources: a local transformers checkpoint directory, or "tiny" (a random tiny Llama + BLIP-2 VPG built
once into $PILL_TINY_DIR, default .cache/tiny_pill: the debug model of the embedded demo and of the tests).
No hub access. Frozen weights load in the dtype they will run in (bf16 for bf16 training) straight from the
safetensors files, never through an fp32 copy; under an active ZeRO-3 config (transformers' HfDeepSpeedConfig,
set up by the trainer) `from_pretrained` builds the LLM partitioned from the start (DeepSpeed zero.Init).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.model.base import FrozenLLMMethod, read_export_meta
from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL, check_llm
from pipeline.model.vpg import VPG

VPGSource = str | Path | dict | None
TINY = "tiny"


def tiny_dir() -> Path:
    return Path(os.environ.get("PILL_TINY_DIR", ".cache/tiny_pill"))


def resolve_source(source: str | Path | None, kind: str) -> str | Path | None:
    """"tiny" -> the directory of the tiny random model of that kind ("llm" or "vpg"), built on first use."""
    if str(source) != TINY:
        return source
    from pipeline.model.tiny import build_tiny_pill_dirs

    return build_tiny_pill_dirs(tiny_dir())[kind]


def default_dtype() -> torch.dtype:
    """Frozen weights in bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and not what tests compare)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_llm(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """(frozen causal LM, tokenizer). `device`: where the weights are materialised (default: CPU)."""
    path = Path(resolve_source(path, "llm"))
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory {path} does not exist (give a local transformers checkpoint dir)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLM directory {path} has no config.json")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    check_llm(config, source=str(path / "config.json"))
    kwargs: dict[str, Any] = {"dtype": dtype or default_dtype(), "local_files_only": True}
    direct = device is not None and not _zero3_active() and _has_accelerate()
    if direct:  # straight from the safetensors files onto the device
        kwargs["device_map"] = {"": torch.device(device)}
    llm = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device is not None and not direct and not _zero3_active():
        llm.to(device)  # one host copy in the target dtype, then moved
    llm.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return llm, tokenizer


def load_vpg(source: VPGSource, dtype: torch.dtype | None = None, device: torch.device | str | None = None
             ) -> VPG | None:
    """None (precomputed features), a transformers BLIP-2 dir / "tiny", or {"qformer": pth, "vit": pth,
    "config": dir} (LAVIS checkpoints)."""
    if source is None:
        return None
    if isinstance(source, dict):
        unknown = set(source) - {"qformer", "vit", "config"}
        if unknown or "qformer" not in source or "config" not in source:
            raise ValueError(f"LAVIS VPG source needs keys qformer, config (and vit); got {sorted(source)}")
        vpg = VPG.from_lavis(source["qformer"], source.get("vit"), source["config"])
    else:
        vpg = VPG.from_pretrained(resolve_source(source, "vpg"))
    # The Q-former stays fp32 as in transformers' BLIP-2; the ViT follows the frozen LLM's dtype.
    vpg.vision_model.to(dtype or default_dtype())
    return vpg.to(device) if device is not None else vpg


def load_pill(llm_path: str | Path, vpg_path: VPGSource = None, cfg: PILLConfig | None = None,
              dtype: torch.dtype | None = None, adapter_path: str | Path | None = None,
              device: torch.device | str | None = None) -> PILL:
    """The frozen LLM + VPG from local paths with PILL's trainable modules (fresh, or from `adapter_path`).

    K and the Q-former width left as None in `cfg` are taken from the VPG."""
    cfg = cfg or PILLConfig()
    llm, tokenizer = load_llm(llm_path, dtype, device)
    vpg = load_vpg(vpg_path, dtype, device)
    model = PILL(llm, cfg, vpg, tokenizer)
    if device is not None:
        model.projection.to(device)
        model.blocks.to(device)
    if adapter_path is not None:
        model.load_adapter(adapter_path)
    return model


def load_method(method: str, llm_path: str | Path, vision_path: Any, cfg: Any = None,
                dtype: torch.dtype | None = None, adapter_path: str | Path | None = None,
                device: torch.device | str | None = None) -> FrozenLLMMethod:
    """Any registered method (pipeline.model.methods) by name, built the same way as `load_pill`."""
    from pipeline.model.methods import get_method

    return get_method(method).load(llm_path, vision_path, cfg, dtype=dtype, adapter_path=adapter_path,
                                   device=device)


def load_export(export_dir: str | Path, llm_path: str | Path, vision_path: Any = None,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                **config_overrides: Any) -> FrozenLLMMethod:
    """The model an export was trained as (its method and config from adapter_config.json), with its weights."""
    from pipeline.model.methods import get_method

    meta = read_export_meta(export_dir)
    spec = get_method(meta["method"])
    cfg = spec.config_cls.from_dict({**meta["config"], **config_overrides})
    return spec.load(llm_path, vision_path, cfg, dtype=dtype, adapter_path=export_dir, device=device)


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _zero3_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
