"""Backward passes that take a stack of cotangents: how GIM's custom autograd Functions batch under vmap.

``explain_answer`` pushes M cotangents back through one forward pass with ``torch.func.vmap`` over
``torch.autograd.grad`` (``gim_fast.engine``). torch's own backward formulas batch under vmap by themselves; a
custom ``autograd.Function`` whose backward is plain elementwise torch code does too (``ScaleGrad``, the torch
frozen norms, the eager ``TemperedSoftmax``). A backward that accumulates into preallocated buffers, calls
autograd itself, or launches a Triton kernel cannot take vmap's batched tensors, so it hands its work to
``backward_op(rule, *grads, *saved)``: an ``autograd.Function`` whose ``vmap`` staticmethod receives the
cotangents unwrapped, with the cotangent dim moved to the front, and calls ``rule.many`` once for the whole
stack — so the saved tensors (Q, K, V, forward statistics) are shared by the stack, never copied or recomputed
per cotangent. Outside vmap it calls ``rule.one``. A rule is a :class:`CotangentRule`.

GIM's forward Functions use the ``setup_context`` form that torch.func requires (a checkpointed layer is
recomputed, forward Functions included, while the cotangents are being vmapped), with
``vmap = unbatched_forward_only``.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch

__all__ = ["CotangentRule", "backward_op", "unbatched_forward_only"]


class CotangentRule(Protocol):
    """A GIM backward that serves one cotangent or a stack of them (see the module docstring).

    ``grads``: how many leading arguments of ``one``/``many`` are cotangents; the rest are saved tensors, shared
    by the whole stack. ``one(*grads, *saved)`` returns the input gradients for one cotangent;
    ``many(*grads, *saved)``, every cotangent with a leading stack dim M, returns them with that leading dim.
    """

    grads: ClassVar[int]

    def one(self, *args: torch.Tensor) -> tuple[torch.Tensor | None, ...]: ...

    def many(self, *args: torch.Tensor) -> tuple[torch.Tensor | None, ...]: ...


def unbatched_forward_only(info, in_dims, *args):
    """The ``vmap`` staticmethod of GIM's forward Functions. torch.func calls a Function's vmap rule only when one
    of its inputs is batched — never while cotangents are vmapped (a checkpointed layer recomputed inside the
    vmapped backward has plain inputs) — but insists that the rule exist; vmap over the forward pass itself is
    not supported."""
    raise NotImplementedError("gim_fast: vmap over the forward pass of a GIM op is not supported (vmap over its "
                              "cotangents is: see gim_fast.ops.cotangents)")


class _BackwardOp(torch.autograd.Function):
    """Value: ``rule.one(*args)``; under vmap: ``rule.many`` on the unwrapped stack of cotangents."""

    @staticmethod
    def forward(rule, *args):
        return tuple(rule.one(*args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("gim_fast: GIM backward passes are not differentiable (no double backward)")

    @staticmethod
    def vmap(info, in_dims, rule, *args):
        dims = in_dims[1:]
        grads, saved = args[:rule.grads], args[rule.grads:]
        if all(d is None for d in dims[:rule.grads]):  # no cotangent is batched: one backward serves all
            outputs = tuple(rule.one(*args))
            return outputs, (None,) * len(outputs)
        if any(d is not None for d in dims[rule.grads:]):  # cannot happen: the forward refuses batched inputs
            raise NotImplementedError("gim_fast: a GIM backward under vmap with batched saved tensors")
        stacked = tuple(g.movedim(d, 0) if d is not None else g.expand(info.batch_size, *g.shape)
                        for g, d in zip(grads, dims[:rule.grads]))
        outputs = tuple(rule.many(*stacked, *saved))
        return outputs, (0,) * len(outputs)


def backward_op(rule: CotangentRule, *args) -> tuple[torch.Tensor, ...]:
    """``rule.one(*args)``, or under ``torch.func.vmap`` over the cotangents, ``rule.many`` once for the stack."""
    return _BackwardOp.apply(rule, *args)
