"""The torch.library registration: both ops compile as single nodes with torch.compile(fullgraph=True), their
fake implementations and autograd pass opcheck, and importing the folder under both names does not collide.

CPU: the ops run the Triton interpreter (conftest sets TRITON_INTERPRET=1) or, with it switched off, the
reference inside the op; the compiler backend is aot_eager (the graph capture is what is under test).
"""

import importlib
import inspect
import pkgutil

import pill_kernels
import pytest
import torch
from pill_kernels import attention, ops
from pill_kernels import routed_adapter as ra
from pill_kernels.attention import op as attn_op


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, 4, 16, generator=gen)
    k = torch.randn(2, 9, 2, 16, generator=gen)
    v = torch.randn(2, 9, 2, 16, generator=gen)
    g = torch.tanh(torch.randn(2, 9, 4, generator=gen))
    x = torch.randn(2, 9, 32, generator=gen)
    route = torch.randint(0, 2, (2, 9), generator=gen)
    ws = [
        torch.randn(2, 8, 32, generator=gen) / 6,
        torch.randn(2, 8, 32, generator=gen) / 6,
        torch.randn(2, 32, 8, generator=gen) / 3,
    ]
    return [t.requires_grad_() for t in (q, k, v, g)], x.requires_grad_(), route, [w.requires_grad_() for w in ws]


def _block(attn, x, route, ws):
    """A PILL-block-like function: gated attention, then the routed adapter on its output."""
    q, k, v, g = attn
    o = pill_kernels.gated_attention(q, k, v, g, causal=True)  # (B, T, Hq, D)
    h = o.reshape(2, 9, 64)[..., :32] + x
    sched = pill_kernels.build_route_schedule(route, 2)
    return pill_kernels.routed_swiglu_adapter(h, sched, *ws)


def _grads(fn, attn, x, route, ws):
    y = fn(attn, x, route, ws)
    leaves = [*attn, x, *ws]
    return [y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))]


@pytest.mark.parametrize("path", ["interpreter", "reference"])
def test_compile_fullgraph_matches_eager(path, monkeypatch):
    if path == "reference" or not attn_op._INTERPRETED:
        monkeypatch.setattr(attn_op, "_INTERPRETED", False)
        monkeypatch.setattr(ra, "_INTERPRETED", False)
    attn, x, route, ws = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, attn, x, route, ws)
    want = _grads(lambda a, xx, r, w: _block_ref(a, xx, r, w), attn, x, route, ws)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _block_ref(attn, x, route, ws):
    q, k, v, g = attn
    o = pill_kernels.gated_attention_ref(q, k, v, g, causal=True)
    return pill_kernels.routed_swiglu_adapter_ref(o.reshape(2, 9, 64)[..., :32] + x, route, *ws)


def test_compile_calls_the_ops_as_single_nodes():
    """The captured graph holds the custom ops themselves, not the kernels' internals."""
    attn, x, route, ws = _inputs()
    seen = []

    def backend(gm, _example):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(_block, fullgraph=True, backend=backend)(attn, x, route, ws)
    if attn_op._use_triton(x):
        assert any("gated_attention_fwd" in s for s in seen), seen
        assert any("routed_swiglu_adapter_fwd" in s for s in seen), seen


@pytest.mark.parametrize("path", ["interpreter", "reference"])
def test_opcheck(path, monkeypatch):
    """Schema, fake (meta) implementation and autograd registration are consistent with the real ones."""
    if path == "reference" or not attn_op._INTERPRETED:
        monkeypatch.setattr(attn_op, "_INTERPRETED", False)
        monkeypatch.setattr(ra, "_INTERPRETED", False)
    (q, k, v, g), x, route, ws = _inputs(seed=1)
    torch.library.opcheck(
        attn_op.gated_attention_fwd,
        (q, k, v, g, None, None, True, None, 0.25),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    # packed, SmolLM2's head counts (9 query / 3 KV heads, head dim 64), a 1-token document
    gen = torch.Generator().manual_seed(2)
    qp, kp, vp = (torch.randn(20, h, 64, generator=gen).requires_grad_() for h in (9, 3, 3))
    gp = torch.tanh(torch.randn(20, 9, generator=gen)).requires_grad_()
    cu = torch.tensor([0, 1, 13, 20], dtype=torch.int32)
    torch.library.opcheck(
        attn_op.gated_attention_fwd,
        (qp, kp, vp, gp, cu, None, True, 12, 0.125),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    sched = pill_kernels.build_route_schedule(route, 2)
    torch.library.opcheck(
        ops.routed_swiglu_adapter_fwd,
        (x, route, sched.perm, sched.offs, *ws),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_both_import_names_register_their_own_ops():
    """`python -m kernels.bench` imports the folder as `kernels`, the model as `pill_kernels`: no collision."""
    repo_kernels = importlib.import_module("kernels")
    assert repo_kernels is not pill_kernels
    for ns in ("kernels", "pill_kernels"):
        namespace = getattr(torch.ops, ns)
        for name in (
            "gated_attention_fwd",
            "gated_attention_bwd",
            "routed_swiglu_adapter_fwd",
            "routed_swiglu_adapter_bwd",
        ):
            assert hasattr(namespace, name), f"{ns}::{name}"


def test_no_package_attribute_shadows_a_module():
    """`pill_kernels.gated_attention` is the function and no module hides behind a name of the package (the old
    kernels/gated_attention.py was reachable only through importlib): every submodule name is either unset or
    that module."""
    for pkg in (pill_kernels, attention):
        for info in pkgutil.iter_modules(pkg.__path__):
            attr = getattr(pkg, info.name, None)
            assert attr is None or inspect.ismodule(attr), f"{pkg.__name__}.{info.name} is {attr!r}"
