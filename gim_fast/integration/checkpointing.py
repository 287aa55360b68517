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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module):
    layers = decoder_layers(model)
    saved = [(layer, "forward" in layer.__dict__, layer.__dict__.get("forward")) for layer in layers]
    try:
        for layer in layers:
            inner = layer.forward
            layer.forward = lambda *args, _inner=inner, **kwargs: checkpoint(_inner, *args, use_reentrant=False,
                                                                              **kwargs)
        yield
    finally:
        for layer, had_own, old in saved:
            if had_own:
                layer.forward = old
            else:
                layer.__dict__.pop("forward", None)
