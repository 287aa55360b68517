"""Per-decoder-layer activation checkpointing, switched on per instance for the duration of a context.

transformers' own ``gradient_checkpointing_enable`` only acts in training mode, and attribution runs in eval
mode, so each decoder layer's ``forward`` is wrapped in ``torch.utils.checkpoint`` (non-reentrant: keyword
arguments and inputs without ``requires_grad`` are fine). Only the layer inputs stay alive between forward and
backward; each layer is recomputed when the backward reaches it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .state import ModelState


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer`` modules), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # loaded on first use, not on import

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module):
    """Every decoder layer's forward runs under ``torch.utils.checkpoint`` for the duration."""
    with ModelState() as state:
        for layer in decoder_layers(model):
            inner = layer.forward
            state.swap_forward(layer, lambda *args, _inner=inner, **kwargs: checkpoint(
                _inner, *args, use_reentrant=False, **kwargs))
        yield
