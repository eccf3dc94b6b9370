"""Build PILL from local directories: the frozen LLM (+ tokenizer) and the frozen VPG. No hub access."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL, check_llm
from pipeline.model.vpg import VPG

VPGSource = str | Path | dict | None


def default_dtype() -> torch.dtype:
    """Frozen weights in bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and not what tests compare)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_llm(path: str | Path, dtype: torch.dtype | None = None):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory {path} does not exist (give a local transformers checkpoint dir)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLM directory {path} has no config.json")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    check_llm(config, source=str(path / "config.json"))
    llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or default_dtype(), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return llm, tokenizer


def load_vpg(source: VPGSource, dtype: torch.dtype | None = None) -> VPG | None:
    """None (precomputed features), a transformers BLIP-2 dir, or {"qformer": pth, "vit": pth, "config": dir}."""
    if source is None:
        return None
    if isinstance(source, dict):
        unknown = set(source) - {"qformer", "vit", "config"}
        if unknown or "qformer" not in source or "config" not in source:
            raise ValueError(f"LAVIS VPG source needs keys qformer, config (and vit); got {sorted(source)}")
        vpg = VPG.from_lavis(source["qformer"], source.get("vit"), source["config"])
    else:
        vpg = VPG.from_pretrained(source)
    # The Q-former stays fp32 as in transformers' BLIP-2; the ViT follows the frozen LLM's dtype.
    vpg.vision_model.to(dtype or default_dtype())
    return vpg


def load_pill(llm_path: str | Path, vpg_path: VPGSource = None, cfg: PILLConfig | None = None,
              dtype: torch.dtype | None = None, adapter_path: str | Path | None = None) -> PILL:
    """The frozen LLM + VPG from local paths with PILL's trainable modules (fresh, or from `adapter_path`)."""
    cfg = cfg or PILLConfig()
    llm, tokenizer = load_llm(llm_path, dtype)
    vpg = load_vpg(vpg_path, dtype)
    model = PILL(llm, cfg, vpg, tokenizer)
    if adapter_path is not None:
        model.load_adapter(adapter_path)
    return model
