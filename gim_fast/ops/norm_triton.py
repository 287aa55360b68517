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
from torch.autograd.function import once_differentiable

from ..kernels.norm import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward
from .norms import _rstd

__all__ = ["TritonFrozenRMSNorm", "TritonFrozenLayerNorm", "frozen_rms_norm_triton", "frozen_layer_norm_triton"]


class TritonFrozenRMSNorm(torch.autograd.Function):
    """RMSNorm whose backward is ``dx = dy · (offset + w) · r``; fused Triton kernels both ways."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, exact_rstd=False):
        rstd = _rstd(x, eps).squeeze(-1) if exact_rstd else None
        y, rstd = rms_norm_forward(x, weight, eps, offset, rstd=rstd)
        ctx.offset, ctx.x_dtype = offset, x.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad_out, x, weight, rstd, ctx.offset, ctx.needs_input_grad[1],
                                           x_dtype=ctx.x_dtype, need_input_grad=ctx.needs_input_grad[0])
        return grad_x, grad_w, None, None, None


class TritonFrozenLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward is ``dx = (g − mean(g)) / σ`` with ``g = dy · w``; fused Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, (bias.dtype if bias is not None else None)
        keep_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep_x else None, mean if keep_x else None, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mean, weight, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = layer_norm_backward(
            grad_out, x, weight, mean, rstd, ctx.needs_input_grad[1], ctx.needs_input_grad[2],
            x_dtype=ctx.x_dtype, bias_dtype=ctx.bias_dtype, need_input_grad=ctx.needs_input_grad[0])
        return grad_x, grad_w, grad_b, None


def frozen_rms_norm_triton(x, weight, eps, offset=0.0, *, exact_rstd=False):
    """``FrozenRMSNorm.apply(x, weight, eps, offset)`` on Triton kernels.

    ``exact_rstd=True`` computes r = rsqrt(mean(x₃₂²) + eps) with torch (one more pass over x) so that the
    forward equals the Hugging Face module's bit for bit on every device; by default the kernel computes r
    itself (≤ 2 ulp from torch's in float32, from the summation order).
    """
    return TritonFrozenRMSNorm.apply(x, weight, float(eps), float(offset), bool(exact_rstd))


def frozen_layer_norm_triton(x, weight, bias, eps):
    """``FrozenLayerNorm.apply(x, weight, bias, eps)`` on Triton kernels."""
    return TritonFrozenLayerNorm.apply(x, weight, bias, float(eps))
