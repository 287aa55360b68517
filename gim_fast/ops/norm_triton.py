"""Frozen norms on the Triton kernels of ``gim_fast.kernels.norm``: the ``triton`` backend of
``frozen_rms_norm`` / ``frozen_layer_norm``.

Same semantics as ``FrozenRMSNorm`` / ``FrozenLayerNorm`` in ``norms.py`` (the ``torch`` backend): the forward
is the module's own up to the order of the row sum (r within 2 ulp of torch's in float32; pass
``exact_rstd=True`` to compute r with torch and get torch's RMSNorm forward bit for bit), the backward treats
the statistic as a constant, and x is kept for the backward only when the weight needs a gradient.
Inputs of any leading shape; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from ..kernels.norm import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward
from .cotangents import backward_op, unbatched_forward_only
from .norms import _rstd

__all__ = ["TritonFrozenRMSNorm", "TritonFrozenLayerNorm", "frozen_rms_norm_triton", "frozen_layer_norm_triton"]


class TritonFrozenRMSNorm(torch.autograd.Function):
    """RMSNorm whose backward is ``dx = dy · (offset + w) · r``; fused Triton kernels both ways. Returns
    ``(y, r)``; r is not differentiable."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(x, weight, eps, offset, exact_rstd=False):
        rstd = _rstd(x, eps).squeeze(-1) if exact_rstd else None
        return rms_norm_forward(x, weight, eps, offset, rstd=rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, ctx.offset = inputs[:4]
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_rstd=None):
        x, weight, rstd = ctx.saved_tensors
        if ctx.needs_input_grad[1]:  # a weight gradient: one cotangent, no vmap (attribution never asks for it)
            grad_x, grad_w = rms_norm_backward(grad_out, x, weight, rstd, ctx.offset, True, x_dtype=ctx.x_dtype,
                                               need_input_grad=ctx.needs_input_grad[0])
            return grad_x, grad_w, None, None, None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (grad_x,) = backward_op(_TritonRMSNormRule(ctx.offset, ctx.x_dtype), grad_out, weight, rstd)
        return grad_x, None, None, None, None


class _TritonRMSNormRule:
    """The :class:`~gim_fast.ops.cotangents.CotangentRule` of the frozen RMSNorm: dx for one cotangent, or a stack
    of them (one kernel launch each, the saved r shared; the backward is memory-bound, so one launch per cotangent
    moves the same bytes as one for the stack)."""

    grads = 1

    def __init__(self, offset, x_dtype):
        self.offset, self.x_dtype = offset, x_dtype

    def one(self, grad_out, weight, rstd):
        return rms_norm_backward(grad_out, None, weight, rstd, self.offset, False, x_dtype=self.x_dtype)[:1]

    def many(self, grad_out, weight, rstd):
        return (torch.stack([self.one(g, weight, rstd)[0] for g in grad_out]),)


class TritonFrozenLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward is ``dx = (g − mean(g)) / σ`` with ``g = dy · w``; fused Triton kernels. Returns
    ``(y, mean, 1/σ)``; mean and 1/σ are not differentiable."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(x, weight, bias, eps):
        return layer_norm_forward(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.x_dtype, ctx.bias_dtype = x.dtype, (bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(mean, rstd)
        keep_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep_x else None, mean if keep_x else None, weight, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean=None, _grad_rstd=None):
        x, mean, weight, rstd = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # weight/bias gradients: one cotangent, no vmap
            grad_x, grad_w, grad_b = layer_norm_backward(
                grad_out, x, weight, mean, rstd, ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                x_dtype=ctx.x_dtype, bias_dtype=ctx.bias_dtype, need_input_grad=ctx.needs_input_grad[0])
            return grad_x, grad_w, grad_b, None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (grad_x,) = backward_op(_TritonLayerNormRule(ctx.x_dtype), grad_out, weight, rstd)
        return grad_x, None, None, None


class _TritonLayerNormRule:
    """The :class:`~gim_fast.ops.cotangents.CotangentRule` of the frozen LayerNorm: dx for one cotangent, or a stack
    of them (one kernel launch each, σ shared)."""

    grads = 1

    def __init__(self, x_dtype):
        self.x_dtype = x_dtype

    def one(self, grad_out, weight, rstd):
        return layer_norm_backward(grad_out, None, weight, None, rstd, False, False, x_dtype=self.x_dtype)[:1]

    def many(self, grad_out, weight, rstd):
        return (torch.stack([self.one(g, weight, rstd)[0] for g in grad_out]),)


def frozen_rms_norm_triton(x, weight, eps, offset=0.0, *, exact_rstd=False):
    """``FrozenRMSNorm.apply(x, weight, eps, offset)`` on Triton kernels.

    ``exact_rstd=True`` computes r = rsqrt(mean(x₃₂²) + eps) with torch (one more pass over x) so that the
    forward equals the Hugging Face module's bit for bit on every device; by default the kernel computes r
    itself (≤ 2 ulp from torch's in float32, from the summation order).
    """
    return TritonFrozenRMSNorm.apply(x, weight, float(eps), float(offset), bool(exact_rstd))[0]


def frozen_layer_norm_triton(x, weight, bias, eps):
    """``FrozenLayerNorm.apply(x, weight, bias, eps)`` on Triton kernels."""
    return TritonFrozenLayerNorm.apply(x, weight, bias, float(eps))[0]
