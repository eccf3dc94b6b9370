"""The experts' stacked weights and their compute-dtype copy: made once per optimizer step per layer, not per call.

pipeline/model/adapters.py keeps the experts as separate Linear modules and stacks their weights for the fused
kernel (kernels/routed_adapter.py), which casts the stack; both copies live in kernels/weight_cache.py, one cache
emptied by one optimizer-step hook. Every forward of a step (gradient-accumulation micro-batches, checkpoint
recomputation) must share one stack and one cast, the experts' fp32 gradients must stay bitwise those of stacking
per call, and a weight change (optimizer step, a write through .data, a ZeRO-3 gather into new memory) must miss.
CPU: the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32, tiny shapes.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from pill_kernels import routed_adapter as ra
from pill_kernels import routed_swiglu_adapter, routed_swiglu_adapter_ref, weight_cache
from torch.optim import optimizer
from torch.utils.checkpoint import checkpoint

from pipeline.model import adapters as ad

requires_triton_path = pytest.mark.skipif(
    not (torch.cuda.is_available() or ra._INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 before import"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
D, R = 32, 8


def _experts(n=2, seed=0):
    torch.manual_seed(seed)
    experts = [ad.Adapter(D, R).to(DEV) for _ in range(n)]
    with torch.no_grad():
        for e in experts:
            e.u.weight.normal_(std=0.1)  # non-zero U (the real init is 0, which hides the up projection)
    return experts


def _batch(seed, n_experts=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, D, generator=g).to(DEV)
    route = torch.randint(0, n_experts, (2, 9), generator=g).to(DEV)
    return x, route, torch.randn(2, 9, D, generator=g).to(DEV)


def _old_path(x, route, experts):
    """What pipeline/model/adapters.py did before: torch.stack the experts' weights on every call."""
    ws = [e.stacked_weights() for e in experts]
    return routed_swiglu_adapter(x, route, *(torch.stack([w[i] for w in ws]) for i in range(3)))


def _ref(x, route, experts):
    """The PyTorch reference on the experts' current weights (no kernel, no cache)."""
    ws = [e.stacked_weights() for e in experts]
    return routed_swiglu_adapter_ref(x, route, *(torch.stack([w[i] for w in ws]) for i in range(3)))


def _grads(experts):
    return {f"{i}.{n}": p.grad.clone() for i, e in enumerate(experts) for n, p in e.named_parameters()}


@pytest.fixture
def counted(monkeypatch):
    """Counts the model-side stacks and the kernel-side casts; both caches start empty."""
    counts = {"stack": 0, "cast": 0}
    real_stack, real_cast = ad._stack, ra._cast

    def stack(*a):
        counts["stack"] += 1
        return real_stack(*a)

    def cast(*a):
        counts["cast"] += 1
        return real_cast(*a)

    monkeypatch.setattr(ad, "_stack", stack)
    monkeypatch.setattr(ra, "_cast", cast)
    weight_cache.clear()
    yield counts
    weight_cache.clear()


@requires_triton_path
def test_accumulated_micro_batches_stack_and_cast_once_with_the_old_gradients(counted):
    """Two micro-batches, then one optimizer step: one stack, one cast, and every expert's fp32 gradient bitwise
    equal to stacking per call (no 'backward through the graph a second time' either)."""
    experts, old = _experts(), _experts()
    for seed in (1, 2):
        x, route, dy = _batch(seed)
        ad.routed_adapter(x, route, experts, "triton").backward(dy)
    assert counted == {"stack": 1, "cast": 1}
    for seed in (1, 2):
        x, route, dy = _batch(seed)
        _old_path(x, route, old).backward(dy)
    assert counted == {"stack": 1, "cast": 3}  # stacking per call: a cast per call
    got, want = _grads(experts), _grads(old)
    assert got.keys() == want.keys() and all(g.dtype == torch.float32 for g in got.values())
    for name in got:
        if DEV == "cpu":  # one token split per expert in the interpreter: a deterministic sum
            assert torch.equal(got[name], want[name]), name
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)


@requires_triton_path
def test_optimizer_step_recasts_and_the_next_forward_sees_the_new_weights(counted):
    experts = _experts()
    opt = torch.optim.AdamW([p for e in experts for p in e.parameters()], lr=1e-2)
    x, route, dy = _batch(3)
    y0 = ad.routed_adapter(x, route, experts, "triton")
    y0.backward(dy)
    ad.routed_adapter(x, route, experts, "triton")  # same step: both caches hit
    assert counted == {"stack": 1, "cast": 1}
    opt.step()
    assert weight_cache.entries() == 0  # the step hook empties the cache: stacks and casts
    y1 = ad.routed_adapter(x, route, experts, "triton")
    assert counted == {"stack": 2, "cast": 2}
    assert not torch.equal(y1, y0)
    torch.testing.assert_close(y1, _ref(x, route, experts), atol=1e-5, rtol=1e-5)


@requires_triton_path
def test_checkpoint_recomputation_shares_the_step_copy(counted):
    experts, old = _experts(), _experts()
    x, route, dy = _batch(4)
    y = checkpoint(ad.routed_adapter, x, route, experts, "triton", use_reentrant=False)
    y.backward(dy)
    assert counted == {"stack": 1, "cast": 1}  # the forward and its recomputation in the backward
    _old_path(x, route, old).backward(dy)
    want = _grads(old)
    for name, g in _grads(experts).items():
        torch.testing.assert_close(g, want[name], atol=1e-6, rtol=1e-6)


@requires_triton_path
def test_weights_changed_without_a_version_bump_never_come_back_stale(counted):
    """ZeRO-3 gathers a parameter into new memory (a new data_ptr): a miss. DeepSpeed's step writes through .data
    (same memory, no version bump): stale until the step, whose hook empties the caches."""
    experts = _experts()
    x, route, _ = _batch(5)
    ad.routed_adapter(x, route, experts, "triton")
    w = experts[1].u.weight
    w.data = w.data * 2.0  # new memory, version counter untouched
    y = ad.routed_adapter(x, route, experts, "triton")
    assert counted == {"stack": 2, "cast": 2}
    torch.testing.assert_close(y, _ref(x, route, experts), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        experts[0].d2.weight.data.mul_(0.5)  # in place through .data: what DeepSpeed's optimizer step does
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0).step()
    y = ad.routed_adapter(x, route, experts, "triton")
    assert counted == {"stack": 3, "cast": 3}
    torch.testing.assert_close(y, _ref(x, route, experts), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        experts[0].d1.weight.mul_(3.0)  # an ordinary in-place update bumps the version: a miss
    y = ad.routed_adapter(x, route, experts, "triton")
    assert counted == {"stack": 4, "cast": 4}
    torch.testing.assert_close(y, _ref(x, route, experts), atol=1e-5, rtol=1e-5)


@requires_triton_path
def test_shared_adapter_inference_mode_meta_and_freed_experts(counted):
    shared = _experts(1)
    x, _, dy = _batch(6, n_experts=1)
    with torch.inference_mode():  # its tensors must not land in a cache that training reads later
        y_inf = ad.routed_adapter(x, None, shared, "triton")
    assert weight_cache.entries() == 0
    y = ad.routed_adapter(x, None, shared, "triton")
    torch.testing.assert_close(y_inf, y.detach(), atol=0, rtol=0)
    torch.testing.assert_close(y, shared[0](x), atol=1e-5, rtol=1e-5)
    with torch.device("meta"):
        meta = [ad.Adapter(D, R), ad.Adapter(D, R)]
        stacks = ad.stacked_expert_weights(meta)
    assert [tuple(s.shape) for s in stacks] == [(2, R, D), (2, R, D), (2, D, R)] and weight_cache.entries("stack") == 1
    del shared, y
    gc.collect()
    assert weight_cache.entries() == 0  # entries go with their weights


def test_one_cache_emptied_by_one_step_hook():
    """The model's stacks and the kernel's casts live in one cache with one process-wide optimizer-step hook (not
    a cache and a hook each): every step hook registered from the project's code is weight_cache's."""
    repo = Path(ad.__file__).resolve().parents[2]
    files = {Path(h.__code__.co_filename).resolve() for h in optimizer._global_optimizer_post_hooks.values()}
    assert {f for f in files if f.is_relative_to(repo)} == {Path(weight_cache.__file__).resolve()}
    assert weight_cache.clear in {c for h in optimizer._global_optimizer_post_hooks.values() for c in _called(h)}


def _called(hook) -> set:
    """The module-level functions a hook lambda calls (its code's global names, looked up in its module)."""
    return {hook.__globals__.get(name) for name in hook.__code__.co_names}
