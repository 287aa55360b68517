"""Per-decoder-layer activation checkpointing, switched on per instance for the duration of a context.

transformers' own ``gradient_checkpointing_enable`` only acts in training mode, and attribution runs in eval
mode, so each decoder layer's ``forward`` is wrapped in ``torch.utils.checkpoint`` (non-reentrant: keyword
arguments and inputs without ``requires_grad`` are fine). Only the layer inputs stay alive between forward and
backward; each layer is recomputed when the backward reaches it.

The whole forward of a layer is checkpointed, an accelerate hook's included (``swap_forward(..., around_hooks=True)``):
the recomputation then loads an offloaded layer's weights again, and nothing the first forward loaded is kept for
the backward, so an offloaded model holds one offloaded layer's weights at a time. The recomputation of a layer
with accelerate hooks runs to its end (``early_stop=False``): stopped early, as it is by default once the last
saved tensor is recomputed, it would skip the hook that puts the last submodule's placeholders back, and that
submodule's weights would stay loaded after the call.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .dispatch import has_dispatch_hooks
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
            inner, early_stop = layer.forward, not has_dispatch_hooks(layer)
            state.swap_forward(layer, lambda *args, _inner=inner, _early=early_stop, **kwargs: checkpoint(
                _inner, *args, use_reentrant=False, early_stop=_early, **kwargs), around_hooks=True)
        yield
