"""Activation checkpointing applied from outside the model (torchtitan's way): the model code does not change.

Each chosen decoder layer's forward is wrapped so that, when gradients are being recorded, it runs under
`torch.utils.checkpoint` (non-reentrant: keyword arguments, non-tensor arguments such as the frozen Llama layer
and the attention mask, and ZeRO-3's parameter hooks all work) and is recomputed in the backward; under
`torch.no_grad()` (evaluation, generation) it runs as is. Parameter names do not change, so exports and
checkpoints are the same with and without it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The per-layer modules of a method (FrozenLLMMethod.checkpoint_layers)."""
    try:
        return list(model.checkpoint_layers())
    except (AttributeError, NotImplementedError) as e:
        raise ValueError(f"{type(model).__name__} has no per-layer modules to checkpoint: {e}") from None


def apply_activation_checkpointing(model: nn.Module, every_n_layers: int = 1) -> int:
    """Checkpoint layers 0, n, 2n, ...; returns how many layers are wrapped."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    wrapped = 0
    for i, layer in enumerate(checkpointable_layers(model)):
        if i % every_n_layers == 0 and not getattr(layer, "_pill_checkpointed", False):
            layer.forward = _checkpointed(layer.forward)
            layer._pill_checkpointed = True
            wrapped += 1
    return wrapped


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
