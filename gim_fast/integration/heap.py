"""Freed CPU memory handed back to the system between the modules of a forward and backward pass (glibc only).

glibc's ``malloc`` serves blocks below its dynamic mmap threshold (up to 32 MiB: a layer's activations at a few
thousand tokens) from a heap that keeps what is freed and fragments as long-lived tensors and small objects land
between short-lived ones. On an attribution that is most of the resident memory, and it varies from run to run:
SmolLM2-135M with checkpointed layers at 1,024 tokens (float32, 0.12 GB of live tensors at the peak) peaked
at 0.69–0.71 GB resident above the model; with ``malloc_trim(0)`` after each decoder layer and each of its
sub-modules — forward (forward hooks) and backward (hooks on the gradients of their outputs) — at 0.16–0.17 GB
(``bench/memory.py``; the README's memory section has the whole grid). It costs time: the pages handed back fault
in again on the next allocations. SmolLM2-135M, 2,048 tokens, float32, two threads, quiet machine, three
alternating calls each: ``explain`` 8.55–8.83 s with it, 6.97–7.00 s without (+23 %); after each decoder layer only,
8.31–8.61 s. Planning it (trimming only when the untrimmed heap would not fit) needs an estimate of the untrimmed
heap that holds, which is not measured yet: so it always runs on CPU layers, the safe side. Trimming only
returns free pages to the system: nothing else about the process's allocator changes, and the hooks are
removed on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

import torch
from torch.utils._pytree import tree_leaves

from .checkpointing import decoder_layers


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
    handles = []
    if can_release_heap():
        for layer in decoder_layers(model):
            if next(layer.parameters()).device.type != "cpu":
                continue
            for module in (layer, *layer.children()):
                handles.append(module.register_forward_hook(_after_forward))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
