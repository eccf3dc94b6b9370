"""Constants shared by the model and the data pipeline, with no dependencies (importing this costs nothing).

The data workers need the image normalisation and the placeholder-token rule of the model; importing
`pipeline.model` for them would pull in transformers' Llama (seconds per process), so both sides import these.
"""

from __future__ import annotations

from typing import Any

# BLIP-2 normalises with the CLIP constants (LAVIS `BlipImageEvalProcessor`).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def image_placeholder_id(tokenizer: Any) -> int:
    """Token id written at visual positions before the model overwrites them: unk, else pad, else 0.

    Any id works (the embedding at those positions is replaced); an existing special token keeps the ids valid for
    the embedding table and makes decoded prompts readable."""
    for tid in (getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0
