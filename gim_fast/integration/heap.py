"""Freed CPU memory handed back to the system between the modules of a forward and backward pass (glibc only).

glibc's ``malloc`` serves blocks below its dynamic mmap threshold (up to 32 MiB: a layer's activations at a few
thousand tokens) from a heap that keeps what is freed and fragments as long-lived tensors and small objects land
between short-lived ones. On an attribution that is most of the resident memory, and it varies from run to run.
``malloc_trim(0)`` after each decoder layer and each of its sub-modules — forward (forward hooks) and backward
(hooks on the gradients of their outputs) — keeps the resident memory close to the live tensors, which is what the
memory estimate counts on; it costs time, since the pages handed back fault in again on the next allocations
(docs/memory.md has both measured). Trimming only when the untrimmed heap would not fit would need an estimate of
that heap, so it always runs on CPU layers, the safe side. Trimming only returns free pages to the system: nothing
else about the process's allocator changes, and the hooks are removed on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

import torch
from torch.utils._pytree import tree_leaves

from .checkpointing import decoder_layers
from .state import ModelState


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


_MALLOC_TRIM = _find_malloc_trim()


def can_release_heap() -> bool:
    """Whether this process's C library can hand freed heap memory back (glibc's ``malloc_trim``)."""
    return _MALLOC_TRIM is not None


def _release(*_) -> None:
    _MALLOC_TRIM(0)


def _after_forward(module, args, output) -> None:
    _release()
    grad_input = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad), None)
    if grad_input is not None:
        grad_input.register_hook(_release)  # runs when the backward reaches this module; returns None


@contextlib.contextmanager
def released_heap(model: torch.nn.Module):
    """For the duration, release freed heap memory after each CPU decoder layer and each of its direct
    sub-modules (attention, MLP, norms), in the forward and in the backward. A no-op without glibc."""
    with ModelState() as state:
        if can_release_heap():
            for layer in decoder_layers(model):
                if next(layer.parameters()).device.type != "cpu":
                    continue
                for module in (layer, *layer.children()):
                    state.forward_hook(module, _after_forward)
        yield
