"""The model's PyTorch backends and the kernels' references are two writings of one op: they must agree."""

from __future__ import annotations

import pytest
import torch
from pill_kernels import gated_attention_ref, routed_swiglu_adapter_ref

from pipeline.model.adapters import TEXT, VISUAL, Adapter, routed_adapter
from pipeline.model.attention import AttnMask, eager_attention, sdpa_attention


@pytest.mark.parametrize("hq, hkv, causal", [(4, 4, True), (4, 2, True), (4, 1, False)])
def test_attention_backends_equal_the_kernel_reference(hq, hkv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, hq, 16, generator=g)
    k, v = (torch.randn(2, 11, hkv, 16, generator=g) for _ in range(2))
    gate = torch.rand(2, 11, hq, generator=g)
    ref = gated_attention_ref(q, k, v, gate, causal=causal, softmax_scale=0.25)
    for backend in (eager_attention, sdpa_attention):
        out = backend(q, k, v, gate, AttnMask(causal=causal), 0.25)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_routed_adapter_equals_the_kernel_reference():
    torch.manual_seed(0)
    experts = [Adapter(32, 8), Adapter(32, 8)]
    for e in experts:
        torch.nn.init.normal_(e.u.weight, std=0.1)
    x = torch.randn(3, 7, 32)
    route = torch.randint(0, 2, (3, 7))
    ours = routed_adapter(x, route, experts, "eager")
    ws = [e.stacked_weights() for e in experts]
    ref = routed_swiglu_adapter_ref(x, route, *(torch.stack([w[i] for w in ws]) for i in range(3)))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert (TEXT, VISUAL) == (0, 1)
