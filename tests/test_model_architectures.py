"""Every supported Llama-family architecture on a random tiny config: the methods at init compute the frozen model.

Llama-1/2 (MHA, untied), Llama-3.x (GQA, rope_scaling "llama3" with an original context short enough that the
scaling changes the frequencies the test's positions use, tied embeddings as Llama-3.2), Mistral (GQA, window
wider than the test), Qwen2 (q/k/v biases, random so they count), Qwen3 (per-head q/k RMSNorm, random weights, and
head_dim != hidden / heads). Every 1-D frozen weight (norms, biases) is randomised: a norm at 1 or a bias at 0
would hide a missing one. Then PILL at init equals the transformers model's logits and the trainables are where
the spec puts them (every method's text-only forward at init, the peers' included: tests/test_zero_init.py).
Other architectures are refused from their config.json alone, naming the class and the supported list.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from pipeline.model import PILLConfig, get_method, load_method, load_pill
from pipeline.model.batch import Batch
from pipeline.model.tiny import build_tiny_tokenizer
from tests.helpers import logits_of
from tests.test_peers_models import clip_dir  # noqa: F401  (fixture)

D, L, H = 64, 2, 4
COMMON = dict(
    hidden_size=D,
    intermediate_size=128,
    num_hidden_layers=L,
    num_attention_heads=H,
    max_position_embeddings=256,
    initializer_range=D**-0.5,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
ARCHS = {
    "llama2": (LlamaConfig, dict(num_key_value_heads=H, tie_word_embeddings=False)),
    "llama3": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": (MistralConfig, dict(num_key_value_heads=2, sliding_window=128, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": (
        Qwen3Config,
        dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, use_sliding_window=False),
    ),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("arch_tok"))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_dir(request, tokenizer_dir, tmp_path_factory):
    """(name, dir): a random model of the architecture, saved with save_pretrained next to the tiny tokenizer."""
    cls, extra = ARCHS[request.param]
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    config = cls(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **COMMON,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights (1 at init), q/k/v biases (0 at init)
                p.copy_(
                    1 + 0.3 * torch.randn(p.shape, generator=g)
                    if p.mean() == 1
                    else 0.3 * torch.randn(p.shape, generator=g)
                )
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return request.param, out


def frozen_logits(path, ids):
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


def ids_of(B=2, T=40, seed=3):
    return torch.randint(5, 400, (B, T), generator=torch.Generator().manual_seed(seed))


def test_the_config_has_what_the_architecture_is_tested_for(arch_dir):
    name, path = arch_dir
    llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    attn = llm.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (name == "qwen2")
    assert hasattr(attn, "q_norm") == (name == "qwen3")
    assert attn.head_dim == (24 if name == "qwen3" else D // H)
    if name == "llama3":  # the scaled inverse frequencies differ from plain RoPE's at these positions
        assert llm.model.rotary_emb.rope_type == "llama3"
        plain = 1.0 / (500000.0 ** (torch.arange(0, D // H, 2).float() / (D // H)))
        assert not torch.allclose(llm.model.rotary_emb.inv_freq, plain)


@pytest.mark.parametrize("stage", [1, 2])
def test_pill_at_init_equals_the_frozen_model(arch_dir, stage):
    name, path = arch_dir
    model = load_pill(
        path, None, PILLConfig(stage=stage, rank=4, vpg_width=32, num_query_tokens=4), dtype=torch.float32
    ).eval()
    ids = ids_of()
    ref = frozen_logits(path, ids)
    with torch.no_grad():
        ours = logits_of(model, input_ids=ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_pill_cached_left_padded_decode_equals_the_frozen_model(arch_dir):
    """Generation's path: a left-padded prompt then one token at a time through the cache (RoPE positions from
    the attention mask) gives the frozen model's logits on each row alone."""
    name, path = arch_dir
    model = load_pill(
        path, None, PILLConfig(stage=2, rank=4, vpg_width=32, num_query_tokens=4), dtype=torch.float32
    ).eval()
    ids = ids_of(T=20)
    attn = torch.ones_like(ids)
    attn[1, :6] = 0
    with torch.no_grad():
        out = model(Batch(ids[:, :16], attention_mask=attn[:, :16]), use_cache=True)
        steps = [model.logits(out.hidden[:, -1])]
        for t in range(16, 20):
            out = model(Batch(ids[:, t : t + 1], attention_mask=attn[:, : t + 1]), cache=out.kv_cache, use_cache=True)
            steps.append(model.logits(out.hidden[:, -1]))
    cached = torch.stack(steps, 1)  # predictions after positions 15..19
    for row, start in ((0, 0), (1, 6)):
        ref = frozen_logits(path, ids[row : row + 1, start:])[0, 15 - start :]
        torch.testing.assert_close(cached[row], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_pill_trainables_sit_where_the_spec_puts_them(arch_dir):
    name, path = arch_dir
    r, W = 4, 32
    model = load_pill(path, None, PILLConfig(stage=2, rank=r, vpg_width=W, num_query_tokens=4), dtype=torch.float32)
    adapter = {"d1.weight": (r, D), "d2.weight": (r, D), "u.weight": (D, r)}
    want = {"projection.weight": (D, W)}
    for i in range(L):
        for mod in ("attn_adapter", "adapter_t", "adapter_v"):
            want |= {f"blocks.{i}.{mod}.{k}": s for k, s in adapter.items()}
        want[f"blocks.{i}.gate.weight"] = (H, D)  # W_g: d -> query heads, whatever the KV heads
    got = {n: tuple(p.shape) for n, p in model.trainable_parameters()}
    assert got == want
    zero_init = [p for n, p in model.named_parameters() if n.endswith((".u.weight", "gate.weight"))]
    assert len(zero_init) == 4 * L and all(torch.count_nonzero(p) == 0 for p in zero_init)
    model.set_stage(1)
    assert {n for n, _ in model.trainable_parameters()} == {"projection.weight"} | {
        f"blocks.{i}.adapter_v.{k}" for i in range(L) for k in adapter
    }
    assert not any(p.requires_grad for p in model.llm.parameters())


@pytest.mark.parametrize(
    "config", [PhiConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)], ids=["phi"]
)
def test_other_architectures_are_refused_before_weights_load(tmp_path, config):
    config.save_pretrained(tmp_path)  # config.json only: refused before any weight file is looked for
    with pytest.raises(
        ValueError,
        match=r"PhiConfig \(model_type='phi'\) is not supported.*'llama', 'mistral', "
        r"'qwen2', 'qwen3'.*Qwen3ForCausalLM",
    ):
        load_pill(tmp_path, None, PILLConfig())
    with pytest.raises(ValueError, match="model_type='phi'"):
        load_method("lavin", tmp_path, None, get_method("lavin").config_cls())
