"""PILL: a frozen Llama-family LLM with adapter experts (MoMAE), modality attention gates (MAG) and a VPG."""

from pipeline.model.config import PILLConfig
from pipeline.model.load import load_llm, load_pill, load_vpg
from pipeline.model.pill import PILL, PILLOutput, causal_lm_loss, image_placeholder_id, is_trainable
from pipeline.model.vpg import IMAGE_MEAN, IMAGE_STD, VPG

__all__ = ["PILLConfig", "PILL", "PILLOutput", "VPG", "IMAGE_MEAN", "IMAGE_STD", "load_pill", "load_llm",
           "load_vpg", "causal_lm_loss", "image_placeholder_id", "is_trainable"]
