"""PILL and its peers on a frozen Llama-family LLM (docs/model.md, docs/peers.md).

Floors, lowest first (scripts/import_graph.py checks them): the parts (config, base, attention, adapters, VPG,
CLIP, tiny/GGUF sources) -> frozen.py (loading the frozen LLM and front ends) and seq.py (the forward bookkeeping
every method shares) -> the methods (block.py + pill.py, peers/) -> methods.py (the table).
"""

from pipeline.constants import IMAGE_MEAN, IMAGE_STD, image_placeholder_id
from pipeline.model.base import FrozenLLMMethod, MethodConfig, MethodOutput, MethodSpec, read_export_meta
from pipeline.model.config import PILLConfig
from pipeline.model.frozen import check_llm, default_dtype, load_clip, load_llm, load_vpg, resolve_source
from pipeline.model.methods import METHODS, get_method, load_export, load_method, method_names, register
from pipeline.model.pill import PILL, is_trainable, load_pill
from pipeline.model.vpg import VPG

__all__ = [
    "PILLConfig",
    "PILL",
    "VPG",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "FrozenLLMMethod",
    "MethodConfig",
    "MethodOutput",
    "MethodSpec",
    "METHODS",
    "get_method",
    "method_names",
    "register",
    "load_pill",
    "load_llm",
    "load_vpg",
    "load_clip",
    "load_method",
    "load_export",
    "read_export_meta",
    "check_llm",
    "default_dtype",
    "resolve_source",
    "image_placeholder_id",
    "is_trainable",
]
