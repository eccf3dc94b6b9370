"""PILL: a frozen Llama-family LLM with adapter experts (MoMAE), modality attention gates (MAG) and a VPG."""

from pipeline.constants import IMAGE_MEAN, IMAGE_STD, image_placeholder_id
from pipeline.model.base import FrozenLLMMethod, MethodOutput, read_export_meta
from pipeline.model.config import PILLConfig
from pipeline.model.load import load_export, load_llm, load_method, load_pill, load_vpg
from pipeline.model.pill import PILL, PILLOutput, causal_lm_loss, is_trainable
from pipeline.model.vpg import VPG

__all__ = ["PILLConfig", "PILL", "PILLOutput", "VPG", "IMAGE_MEAN", "IMAGE_STD", "FrozenLLMMethod", "MethodOutput",
           "load_pill", "load_llm", "load_vpg", "load_method", "load_export", "read_export_meta", "causal_lm_loss",
           "image_placeholder_id", "is_trainable"]
