"""The method contract (pipeline.model.base, docs/INTERFACES.md) for every registered method, the test plug-in
(tests/toy_method.py) included: a typed Batch in (a misspelt field or control is a TypeError naming it), hidden
states out, and `adapters_off()`: under it the method computes its frozen LLM (text-only logits equal transformers'
own forward) on every architecture the tests build, with every trainable randomised non-zero; leaving it restores
the trained output."""

from __future__ import annotations

import inspect

import pytest
import torch

from pipeline.model import get_method, load_method, method_names
from pipeline.model.base import MethodOutput
from pipeline.model.batch import Batch
from tests import toy_method  # noqa: F401  (registers linear_projector, the test plug-in)
from tests.helpers import logits_of
from tests.test_model_architectures import arch_dir, frozen_logits, ids_of, tokenizer_dir  # noqa: F401  (fixtures)
from tests.test_peers_models import clip_dir  # noqa: F401  (fixture)

METHODS = method_names()
TEXT_UNCHANGED = {"iaa", "linear_projector"}
"""Methods whose text-only rows are the frozen LLM's by design (IAA's text path; the toy has only a projector)."""


def small_config(name: str, **over):
    """The method's config at the tiny test width (front-end sizes given: no front end is needed to build it)."""
    cls = get_method(name).config_cls
    fields = {f for f in cls.__dataclass_fields__}
    sizes = {"rank": 4, "num_query_tokens": 4, "vpg_width": 32}
    return cls(**{k: v for k, v in sizes.items() if k in fields}, **over)


def build(name: str, llm_dir, clip_dir):  # noqa: F811
    front = get_method(name).front_end
    torch.manual_seed(1)
    vision = clip_dir if front == "clip" else None
    cfg = get_method(name).config_cls() if front == "clip" else small_config(name)
    return load_method(name, llm_dir, vision, cfg, dtype=torch.float32).eval()


def randomize_trainables(model, seed: int = 0) -> None:
    """Every trainable parameter random and non-zero, so no path hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + 0.05)
    assert all(bool((p != 0).all()) for _, p in model.trainable_parameters())


def test_the_table_holds_the_plug_in():
    assert "linear_projector" in METHODS and "pill" in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_forward_takes_a_batch_and_named_controls_only(name):
    """No **kwargs in a method's forward: an unknown control cannot be swallowed."""
    sig = inspect.signature(get_method(name).model_cls.forward)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds, sig
    assert list(sig.parameters)[:2] == ["self", "batch"], sig


@pytest.mark.parametrize("name", METHODS)
def test_a_misspelt_field_or_control_is_a_type_error_naming_it(tiny_dirs, clip_dir, name):  # noqa: F811
    model = build(name, tiny_dirs["llm"], clip_dir)
    ids = ids_of(T=12)
    with pytest.raises(TypeError, match="image_feature"):
        Batch(**{"input_ids": ids, "image_feature": torch.zeros(1, 4, 32)})
    with pytest.raises(TypeError, match="past_key_value"):
        model(Batch(ids), past_key_value=None)
    with pytest.raises(TypeError, match="input_ids"):
        model(input_ids=ids)  # the pre-contract keyword call
    with torch.no_grad():
        out = model(Batch(ids))
    assert isinstance(out, MethodOutput) and out.hidden.shape == (*ids.shape, model.llm.config.hidden_size)


@pytest.mark.parametrize("name", METHODS)
def test_adapters_off_is_the_frozen_llm_on_every_architecture(arch_dir, clip_dir, name):  # noqa: F811
    arch, path = arch_dir
    if (arch, name) == ("qwen3", "excitor"):  # refused at load (test_model_architectures): heads x head_dim != d
        pytest.skip("Excitor refuses an LLM whose heads x head_dim != width")
    model = build(name, path, clip_dir)
    randomize_trainables(model)
    ids = ids_of(T=24)
    ref = frozen_logits(path, ids)
    with torch.no_grad():
        trained = logits_of(model, input_ids=ids)
        with model.adapters_off():
            off = logits_of(model, input_ids=ids)
        again = logits_of(model, input_ids=ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(again, trained), "leaving adapters_off() must restore the trained output"
    if name not in TEXT_UNCHANGED:  # the switch must switch something: the trained text output is not the frozen one
        assert (trained - ref).abs().max().item() > 1e-3 * scale


def test_adapters_off_is_refused_by_a_method_that_does_not_implement_it(tiny_dirs):
    model = build("linear_projector", tiny_dirs["llm"], None)
    type(model).supports_adapters_off = False
    try:
        with pytest.raises(NotImplementedError, match="adapters_off"), model.adapters_off():
            pass
    finally:
        type(model).supports_adapters_off = True
    assert model.adapters_enabled
