"""Every method at fresh init is its frozen LLM on text: the first test of every change (DESIGN.md).

For each registered method (PILL and the four peers) and each architecture tests/test_model_architectures.py
builds (Llama-2, Llama-3 with rope scaling and tied embeddings, Mistral, Qwen2 with biases, Qwen3 with q/k norms and
head_dim != hidden / heads; every 1-D frozen weight random), a text-only batch's logits at fresh init equal
transformers' own forward of the frozen LLM, loaded separately from the same directory, to 1e-5 relative.

This is the test that would have caught LaVIN's modality token leaking into every later token (issue 28 item 7):
its authors mask it from every later token (luogen1996/LaVIN lavin/model.py:319-320), so a text-only row at init
is exactly the frozen LLM's; letting the text attend to it gave a relative difference of about 1.

Beside it, per method and architecture with every trainable random: `adapters_off()` on a batch with an image is
the frozen LLM on its token ids, and leaving the switch restores the trained output.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model import PILLConfig, get_method, load_method
from pipeline.model.batch import Batch
from tests.test_model_architectures import arch_dir, frozen_logits, ids_of, tokenizer_dir  # noqa: F401  (fixtures)
from tests.test_peers_models import clip_dir, randomize  # noqa: F401  (fixture)

METHODS = ["pill", "llama_adapter", "lavin", "excitor", "iaa"]
REFUSED = {
    # Excitor's Key_ex (width d) is split into the attention's heads: needs heads x head_dim == d, which Qwen3's
    # head_dim=24 with 4 heads on d=64 is not (pipeline.model.peers.excitor refuses it at build time).
    ("qwen3", "excitor"): "cannot be split into its heads",
}


def fresh(name: str, path, clip):
    """The method at fresh init on the LLM at `path` (PILL on precomputed BLIP-2 features, the peers on CLIP)."""
    torch.manual_seed(1)
    if name == "pill":
        cfg = PILLConfig(stage=2, rank=4, vpg_width=32, num_query_tokens=4)
        return load_method(name, path, None, cfg, dtype=torch.float32).eval()
    return load_method(name, path, clip, get_method(name).config_cls(), dtype=torch.float32).eval()


def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.output_logits(model(Batch(input_ids=ids)))


def max_relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over max |ref|: the figure docs/peers.md's fidelity table reports."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", METHODS)
def test_text_only_logits_at_init_equal_the_frozen_llm(arch_dir, clip_dir, name):  # noqa: F811
    arch, path = arch_dir
    if (arch, name) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[arch, name]):
            fresh(name, path, clip_dir)
        pytest.skip(f"{name} refuses {arch}: {REFUSED[arch, name]} (checked above)")
    model = fresh(name, path, clip_dir)
    ids = ids_of(T=24)
    ref = frozen_logits(path, ids)
    ours = text_logits(model, ids)
    assert ours.shape == ref.shape
    rel = max_relative_difference(ours, ref)
    assert rel <= 1e-5, f"{name} on {arch}: text-only logits at init differ from the frozen LLM by {rel:.3g} relative"


def image_and_text_batch(model, ids: torch.Tensor) -> Batch:
    """Row 0 carries one image (its K placeholder positions at 3..3+K), row 1 is text only."""
    K = model.cfg.num_query_tokens
    mm = torch.zeros_like(ids, dtype=torch.bool)
    mm[0, 3 : 3 + K] = True
    g = torch.Generator().manual_seed(5)
    if model.method == "pill":  # precomputed BLIP-2 features (no VPG loaded)
        feats = torch.randn(1, K, model.cfg.vpg_width, generator=g)
        return Batch(input_ids=ids, modality_mask=mm, image_features=feats)
    return Batch(input_ids=ids, modality_mask=mm, pixel_values=torch.randn(1, 3, 224, 224, generator=g))


def logits_of(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model.output_logits(model(batch))


@pytest.mark.parametrize("name", METHODS)
def test_adapters_off_reads_no_image_and_leaving_it_restores_the_method(arch_dir, clip_dir, name):  # noqa: F811
    """Every trainable random and non-zero: under adapters_off() a batch WITH an image is transformers' forward of
    the LLM on its token ids (the placeholders are the LLM's tokens, the image is not read, no extra token);
    after the block the trained method again, bit for bit. (Text-only batches: tests/test_method_contract.py.)"""
    arch, path = arch_dir
    if (arch, name) in REFUSED:
        pytest.skip(f"{name} refuses {arch}: {REFUSED[arch, name]} (test_text_only_logits_at_init_... checks it)")
    model = fresh(name, path, clip_dir)
    randomize(model)
    ids = ids_of(T=max(24, model.cfg.num_query_tokens + 8))  # IAA: one visual token per CLIP patch
    ref = frozen_logits(path, ids)
    image = image_and_text_batch(model, ids)
    trained = logits_of(model, image)
    assert max_relative_difference(trained, ref) > 1e-3, "the randomised method should differ from its LLM"
    with model.adapters_off():
        off = logits_of(model, image)
    assert max_relative_difference(off, ref) <= 1e-5
    assert torch.equal(logits_of(model, image), trained)
