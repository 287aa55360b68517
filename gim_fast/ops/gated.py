"""The gated product of a gated MLP, ``h = act(g) ⊙ u``, with a backward that shares its per-position factors
across a stack of cotangents.

    forward    h = act(g) ⊙ u                        (the model's own expression, bit for bit)
    backward   dg = act'(g) ⊙ (dh ⊙ u),  du = dh ⊙ act(g)          — the plain gradient, nothing GIM about it

One cotangent: exactly that (two multiplications and act's derivative). M cotangents under ``torch.func.vmap``
(``explain_answer``, via ``gim_fast.ops.cotangents.backward_op``): ``A = u ⊙ act'(g)`` is computed once for the
stack, then dg = dh ⊙ A and du = dh ⊙ act(g) are two multiplications per cotangent instead of three passes over
the whole stack (autograd's ``MulBackward`` then act's backward). ``act`` is any element-wise callable (the MLP's
``act_fn``); ``act_vjp(g, x) = x ⊙ act'(g)``, when the caller knows it (e.g. ``aten.silu_backward``), else it is
a forward-mode product (act is element-wise: its Jacobian is diagonal, so the vector-Jacobian product is the
Jacobian-vector product). Saved: g, u and act(g), the three tensors autograd itself saves for ``act(g) * u``.
"""
from __future__ import annotations

import warnings

import torch

from .cotangents import backward_op, unbatched_forward_only


def _jvp(act, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x ⊙ act'(g)`` by forward mode. torch scripts its forward-mode decompositions on first use, which draws
    a DeprecationWarning from inside torch; it is not the caller's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.func.jvp(act, (g,), (x,))[1]


class _GatedProductRule:
    """The backward as a :class:`~gim_fast.ops.cotangents.CotangentRule` (one cotangent ``dh``, saved g, u, act(g))."""

    grads = 1

    def __init__(self, act, act_vjp):
        self.act_vjp = act_vjp if act_vjp is not None else (lambda g, x: _jvp(act, g, x))

    def one(self, dh, g, u, a):
        return self.act_vjp(g, dh * u), dh * a

    def many(self, dh, g, u, a):  # dh [M, ...]: A = u ⊙ act'(g) once for the stack
        return dh * self.act_vjp(g, u), dh * a


class GatedProduct(torch.autograd.Function):
    """``act(g) ⊙ u``; see the module docstring."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(g, u, act, act_vjp):
        a = act(g)
        return a * u, a

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, u, act, act_vjp = inputs
        ctx.rule = _GatedProductRule(act, act_vjp)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # act(g) is returned only to be saved: no zeros for its gradient
        ctx.save_for_backward(g, u, output[1])

    @staticmethod
    def backward(ctx, dh, _grad_a=None):
        dg, du = backward_op(ctx.rule, dh, *ctx.saved_tensors)
        return dg, du, None, None


def gated_product(act, g: torch.Tensor, u: torch.Tensor, act_vjp=None) -> torch.Tensor:
    """``act(g) * u`` (the value exactly as that expression gives it), with the stack-sharing backward.
    ``act_vjp(g, x)``: ``x ⊙ act'(g)`` if known (faster than the forward-mode fallback)."""
    return GatedProduct.apply(g, u, act, act_vjp)[0]
