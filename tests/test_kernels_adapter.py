"""Routed SwiGLU adapter: Triton forward, dx and every expert's weight gradients against the references.

CPU: the Triton interpreter in fp32 on tiny shapes; GPU (skipped without CUDA): bf16 activations with fp32
weights at LLaMA-2-7B width under the flash-attn tolerance rule.
"""

import gc

import pytest
import torch
from pill_kernels import (
    build_route_schedule,
    routed_swiglu_adapter,
    routed_swiglu_adapter_eager,
    routed_swiglu_adapter_ref,
    weight_cache,
)
from pill_kernels import routed_adapter as ra

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
requires_triton_path = pytest.mark.skipif(
    not (CUDA or ra._INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 set before triton import"
)


def _inputs(shape, d, r, num_experts, route="random", dtype=torch.float32, device=DEV, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=gen)
    if route == "random":
        rt = torch.randint(0, num_experts, shape, generator=gen)
    elif route == "runs":  # PILL-like: runs of visual tokens inside text
        rt = (torch.arange(int(torch.tensor(shape).prod())).view(shape) // 5 % 2).clamp(max=num_experts - 1)
    else:
        rt = torch.full(shape, int(route))
    # non-zero U (the real init is 0, which would hide every bug in the up projection)
    ws = [
        torch.randn(num_experts, r, d, generator=gen) / d**0.5,
        torch.randn(num_experts, r, d, generator=gen) / d**0.5,
        torch.randn(num_experts, d, r, generator=gen) / r**0.5,
    ]
    x = x.to(device=device, dtype=dtype).requires_grad_()
    ws = [w.to(device).requires_grad_() for w in ws]  # adapter weights stay fp32
    return x, rt.to(device), ws


def _run(fn, x, route, ws, dy):
    y = fn(x, route, *ws)
    return [y.detach(), *torch.autograd.grad(y, [x, *ws], dy)]


def _check_fp32(x, route, ws):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    got = _run(routed_swiglu_adapter, x, route, ws, dy)
    ref = _run(routed_swiglu_adapter_ref, x, route, ws, dy)
    for name, a, b in zip(["y", "dx", "dw_gate", "dw_down", "dw_up"], got, ref, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    return got


@requires_triton_path
@pytest.mark.parametrize(
    "shape,d,r,num_experts,route",
    [
        ((2, 17), 64, 32, 2, "random"),  # MoMAE, odd length
        ((2, 17), 64, 32, 2, "runs"),  # visual runs inside text
        ((333,), 32, 8, 3, "random"),  # three experts, r < 16 (masked tile), long
        ((1,), 16, 16, 2, "random"),  # single token
        ((3, 7), 80, 32, 2, "random"),
    ],  # d not a multiple of the d-tile
)
def test_forward_and_gradients(shape, d, r, num_experts, route):
    _check_fp32(*_inputs(shape, d, r, num_experts, route))


@requires_triton_path
@pytest.mark.parametrize("route", [0, 1])
def test_all_text_all_visual_other_expert_gets_zero_grad(route):
    x, rt, ws = _inputs((2, 9), 32, 16, 2, route=route)
    got = _check_fp32(x, rt, ws)
    other = 1 - route
    for g in got[2:]:
        assert g[other].abs().max() == 0 and g[route].abs().max() > 0


@requires_triton_path
def test_unrouted_shared_adapter():
    x, rt, ws = _inputs((4, 11), 48, 32, 1, route=0)
    _check_fp32(x, rt, ws)


@requires_triton_path
def test_bool_route_and_zero_up_is_identity():
    x, rt, ws = _inputs((2, 10), 32, 16, 2)
    y = routed_swiglu_adapter(x, rt.bool(), ws[0], ws[1], torch.zeros_like(ws[2]))
    assert torch.equal(y, x)  # U = 0 (PILL's init): exactly the input
    _check_fp32(x, rt.bool(), ws)


@requires_triton_path
def test_split_weight_gradients_atomics(monkeypatch):
    """The GPU path splits each expert's tokens and adds partial weight grads with atomics: force it here."""
    monkeypatch.setattr(ra, "_dw_split", lambda *a: 3)
    _check_fp32(*_inputs((5, 13), 32, 16, 2, seed=3))


@requires_triton_path
def test_several_d_tiles_with_a_partial_last_one():
    """Both passes loop over d inside one program (d = 200: four 64-wide tiles, the last partial) and the second
    backward pass writes dx tile by tile next to the weight gradients."""
    _check_fp32(*_inputs((3, 11), 200, 16, 2, seed=6))


@requires_triton_path
def test_precomputed_route_schedule_matches_route():
    """A schedule built once per model forward gives the same result as the raw route, in every layer."""
    x, rt, ws = _inputs((2, 19), 64, 16, 2, route="runs", seed=7)
    sched = build_route_schedule(rt, 2)
    assert sched.offs.tolist() == [0, int((rt == 0).sum()), rt.numel()]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = _run(routed_swiglu_adapter, x, sched, ws, dy)
    ref = _run(routed_swiglu_adapter, x, rt, ws, dy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(routed_swiglu_adapter_ref(x, sched, *ws), routed_swiglu_adapter_ref(x, rt, *ws))


def test_route_schedule_errors():
    x, rt, ws = _inputs((2, 5), 32, 16, 2, device="cpu")
    with pytest.raises(ValueError, match="integer"):
        build_route_schedule(rt.float(), 2)
    with pytest.raises(ValueError, match="built for 3 experts"):
        routed_swiglu_adapter(x, build_route_schedule(rt, 3), *ws)


@requires_triton_path
def test_bf16_activations_interpreter():
    x, rt, ws = _inputs((2, 17), 64, 32, 2, seed=4)
    _check_low_precision(x, rt, ws, torch.bfloat16)


def test_eager_and_reference_agree_and_switch(monkeypatch):
    x, rt, ws = _inputs((3, 8), 32, 16, 3, device="cpu", seed=5)
    dy = torch.randn(x.shape)
    eager, ref = _run(routed_swiglu_adapter_eager, x, rt, ws, dy), _run(routed_swiglu_adapter_ref, x, rt, ws, dy)
    for a, b in zip(eager, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # reference against an explicit per-token loop
    xs, w1, w2, w3 = x.detach().view(-1, 32), *(w.detach() for w in ws)
    for t, e in enumerate(rt.view(-1).tolist()):
        want = xs[t] + w3[e] @ (torch.nn.functional.silu(w1[e] @ xs[t]) * (w2[e] @ xs[t]))
        torch.testing.assert_close(
            routed_swiglu_adapter_ref(x, rt, *ws).view(-1, 32)[t], want.detach(), atol=1e-5, rtol=1e-5
        )
    monkeypatch.setattr(ra, "_INTERPRETED", False)
    calls = []
    monkeypatch.setattr(ra, "_triton_adapter", lambda *a: calls.append(1))
    routed_swiglu_adapter(x, rt, *ws)
    assert calls == []  # CPU tensors, no interpreter: the reference runs


def test_errors():
    x, rt, ws = _inputs((2, 4), 16, 8, 2, device="cpu")
    with pytest.raises(ValueError):
        routed_swiglu_adapter(x, rt[:, :3], *ws)
    with pytest.raises(ValueError):
        routed_swiglu_adapter(x, rt, ws[0], ws[1], ws[2][:, :, :4])
    with pytest.raises(ValueError):
        routed_swiglu_adapter(x, rt.float(), *ws)


def _check_low_precision(x32, route, ws, dtype):
    """flash-attn rule: |kernel(dtype) - ref(fp32)| <= 2 |ref(dtype) - ref(fp32)| + eps, per output."""
    dy32 = torch.randn(x32.shape, generator=torch.Generator().manual_seed(2)).to(x32.device)
    x_low = x32.detach().to(dtype).requires_grad_()
    ref32 = _run(routed_swiglu_adapter_ref, x32, route, ws, dy32)
    ref_low = _run(routed_swiglu_adapter_ref, x_low, route, ws, dy32.to(dtype))
    got = _run(routed_swiglu_adapter, x_low, route, ws, dy32.to(dtype))
    for name, a, b, r in zip(["y", "dx", "dw_gate", "dw_down", "dw_up"], got, ref_low, ref32, strict=True):
        assert a.dtype == b.dtype, name
        err = (a.float() - r).abs().max().item()
        base = (b.float() - r).abs().max().item()
        eps = 2 * (r.to(dtype).float() - r).abs().max().item() + 1e-6
        print(f"{dtype} {name}: kernel err {err:.3e}, same-dtype torch err {base:.3e}, eps {eps:.1e}")
        assert err <= 2 * base + eps, name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_experts", [1, 2])
def test_gpu_llama7b_width(dtype, num_experts):
    x, rt, ws = _inputs((2, 1031), 4096, 32, num_experts, route="runs", seed=6)
    _check_low_precision(x, rt, ws, dtype)


def test_weight_copies_cached_per_step(monkeypatch):
    """The compute-dtype weight copies are made once for the same weights or full views of them (forward and
    backward share them), again after an in-place change (version counter) and after an optimizer step, and
    dropped with their weights."""
    casts = []
    real = ra._cast
    monkeypatch.setattr(ra, "_cast", lambda *a: casts.append(1) or real(*a))
    weight_cache.clear()
    _, _, ws = _inputs((2, 5), 32, 16, 2, device="cpu", seed=8)
    first = ra._weights(*ws, torch.float32)
    assert ra._weights(*ws, torch.float32) is first and len(casts) == 1
    # views of the same memory (the model's per-call views of its stack, checkpointing's detached aliases) hit
    assert ra._weights(*(w.detach() for w in ws), torch.float32) is first
    assert ra._weights(*(w.view_as(w) for w in ws), torch.float32) is first and len(casts) == 1
    assert ra._weights(ws[0][:1], ws[1][:1], ws[2][:1], torch.float32) is not first and len(casts) == 2  # a part
    with torch.no_grad():
        ws[0].mul_(2.0)  # bumps the version: a fresh copy
    assert ra._weights(*ws, torch.float32) is not first and len(casts) == 3
    opt = torch.optim.SGD(ws, lr=0.0)
    opt.step()  # the step hook empties the cache (DeepSpeed writes through .data without a version bump)
    assert weight_cache.entries("cast") == 0
    ra._weights(*ws, torch.float32)
    assert len(casts) == 4 and weight_cache.entries("cast") == 1
    del ws, first, opt
    gc.collect()
    assert weight_cache.entries("cast") == 0
