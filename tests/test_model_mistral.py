"""Mistral: PILL equals the frozen model within its sliding window and refuses longer sequences."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from pipeline.model import PILLConfig, load_pill
from pipeline.model.batch import Batch
from pipeline.model.tiny import build_tiny_tokenizer
from tests.helpers import logits_of


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    out = tmp_path_factory.mktemp("mistral")
    tok_dir = build_tiny_tokenizer(out)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=256,
        initializer_range=0.125,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_within_the_window_pill_is_the_frozen_mistral(tiny_mistral):
    model = load_pill(tiny_mistral, None, PILLConfig(stage=2, rank=4), dtype=torch.float32)
    ids = torch.randint(5, 400, (2, 16))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_mistral), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(logits_of(model, input_ids=ids), ref, rtol=0, atol=2e-5)


def test_beyond_the_window_is_refused(tiny_mistral):
    """The frozen Mistral masks keys older than the window; full causal attention does not, so PILL refuses."""
    model = load_pill(tiny_mistral, None, PILLConfig(stage=2, rank=4), dtype=torch.float32)
    ids = torch.randint(5, 400, (1, 24))
    with pytest.raises(ValueError, match="sliding_window=16"):
        model(Batch(ids))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_mistral), dtype=torch.float32)(ids).logits
    model.sliding_window = None  # what computing it anyway would give
    ours = logits_of(model, input_ids=ids)
    torch.testing.assert_close(ours[:, :16], ref[:, :16], rtol=0, atol=2e-5)
    assert (ours[:, 16:] - ref[:, 16:]).abs().max() > 1e-3
