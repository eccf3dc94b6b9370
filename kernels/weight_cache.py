"""Weight copies made once per optimizer step: one cache, emptied by one optimizer-step hook.

Two users, one store: the model stacks its experts' fp32 weights for the fused adapter kernel (pipeline/model/
adapters.py, kind ``"stack"``), and the kernel casts the stack to the activation dtype (routed_adapter.py, kind
``"cast"``). Every forward of a step (gradient-accumulation micro-batches, activation-checkpoint recomputation)
and its backward then share one stack and one cast.

An entry is reused while the objects it was made from are alive (weak references: the entry goes when one is
freed, so an ``id`` in a key is never reused while the entry exists) and every source tensor keeps its
``(data_ptr, version)``: an in-place update bumps the version, a ZeRO-3 gather gives new memory; both miss. An
optimizer step empties the whole cache, because DeepSpeed writes its weights through ``.data``, which bumps no
version. The hook is registered once, here, for every optimizer in the process (torch's global step hook).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

T = TypeVar("T")

# (kind, *key) -> (weak refs to the anchors, (data_ptr, version) of each source tensor, the value)
_CACHE: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[tuple[int, int], ...], Any]] = {}


def clear() -> None:
    """Drop every entry (what an optimizer step does)."""
    _CACHE.clear()


register_optimizer_step_post_hook(lambda *_a, **_k: clear())


def per_step(
    kind: str, key: tuple, anchors: Sequence[object], tensors: Sequence[torch.Tensor], make: Callable[[], T]
) -> T:
    """``make()`` under no_grad, once per optimizer step for ``(kind, *key)``: reused while every anchor (weakly
    referenced; the tensors themselves, or their storages) is the same live object and every tensor's
    ``(data_ptr, version)`` is unchanged. Callers skip the cache where its host-side state does not belong
    (torch.compile tracing, meta tensors, inference mode)."""
    full = (kind, *key)
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    hit = _CACHE.get(full)
    if hit is not None and hit[1] == stamp and all(ref() is a for ref, a in zip(hit[0], anchors, strict=True)):
        return hit[2]
    with torch.no_grad():
        value = make()
    refs = tuple(weakref.ref(a, lambda _r, full=full: _CACHE.pop(full, None)) for a in anchors)
    _CACHE[full] = (refs, stamp, value)
    return value


def entries(kind: str | None = None) -> int:
    """How many entries the cache holds (of one kind, or all): what the tests check."""
    return sum(1 for k in _CACHE if kind is None or k[0] == kind)
