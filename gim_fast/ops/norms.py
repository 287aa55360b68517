"""Norms with frozen statistics: the forward pass is the model's own, bit for bit; the backward treats the
statistic (RMS, or the standard deviation) as a constant.

RMSNorm, r = 1 / sqrt(mean(x²) + eps), w_eff = offset + w:
    offset = 0 (Llama, Qwen, Mistral):  y = w · (x₃₂ · r).to(x.dtype)        — cast before the weight
    offset ≠ 0 (Gemma, (1 + w)):        y = (x₃₂ · r · (offset + w₃₂)).to(x.dtype) — weight in float32
    frozen backward:                    dx = dy · w_eff · r
LayerNorm, σ = sqrt(var(x) + eps), g = dy · w:
    frozen backward:                    dx = (g − mean(g)) / σ        (the mean still carries gradient)

Two backends, as for attention: ``eager`` is the formula written with ``.detach()`` and left to autograd (the
reference); ``torch`` is an ``autograd.Function`` that saves only the statistic (and x when the weight needs a
gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cotangents import unbatched_forward_only


def _rms_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, rstd: torch.Tensor):
    """The module's own forward given ``rstd``; identical op order to the Hugging Face norms."""
    normed = x.to(torch.float32) * rstd
    if weight is None:
        return normed.to(x.dtype)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Sum over every leading dim: ``[..., H] -> [H]`` (also for a 1-D ``[H]``)."""
    return t.reshape(-1, t.shape[-1]).sum(0)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)


def frozen_rms_norm_eager(x, weight, eps, offset=0.0):
    """Reference: the value of the module's own forward; the gradient of ``x · r · w_eff`` with r detached,
    left to autograd (in float64 for float64 inputs)."""
    rstd = _rstd(x, eps).detach()
    with torch.no_grad():
        exact = _rms_forward(x, weight, eps, offset, rstd)
    ct = torch.promote_types(x.dtype, torch.float32)
    w_eff = 1.0 if weight is None else offset + weight.to(ct)
    y = (x.to(ct) * rstd.to(ct) * w_eff).to(exact.dtype)
    return exact + (y - y.detach())


class FrozenRMSNorm(torch.autograd.Function):
    """RMSNorm whose backward is ``dx = dy · (offset + w) · r``. Returns ``(y, r)``; r is not differentiable."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(x, weight, eps, offset):
        rstd = _rstd(x, eps)
        return _rms_forward(x, weight, eps, offset, rstd), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, ctx.offset = inputs
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_rstd=None):
        x, weight, rstd = ctx.saved_tensors
        offset = ctx.offset
        grad_x = grad_w = None
        ct = torch.promote_types(grad_out.dtype, torch.float32)  # float64 models keep float64 gradients
        grad = grad_out.to(ct)
        if ctx.needs_input_grad[0]:
            w_eff = 1.0 if weight is None else offset + weight.to(ct)  # no weight: y = x · r
            # (w_eff · r) first: one [.., S, H] factor, then one pass over grad (under vmap over many cotangents
            # the factor is unbatched, computed once for the whole stack)
            grad_x = (grad * (rstd.to(ct) * w_eff)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            normed = x.to(torch.float32) * rstd
            if offset == 0.0:  # Llama order: the weight multiplies the already-cast activations
                normed = normed.to(x.dtype)
            grad_w = _sum_rows(grad * normed.to(ct)).to(weight.dtype)
        return grad_x, grad_w, None, None


def frozen_layer_norm_eager(x, weight, bias, eps):
    """Reference: LayerNorm written out with σ detached, autograd for the rest.

    The value returned is ``F.layer_norm``'s, bit for bit; the gradient is that of the written-out formula.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True)
    sigma = torch.sqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps).detach()
    y = (xf - mean) / sigma
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    with torch.no_grad():
        exact = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    y = y.to(exact.dtype)
    return exact + (y - y.detach())  # the value of F.layer_norm, the gradient of the formula


class FrozenLayerNorm(torch.autograd.Function):
    """LayerNorm whose backward is ``dx = (g − mean(g)) / σ`` with ``g = dy · w``. Returns ``(y, mean, 1/σ)``
    (``torch.native_layer_norm``'s outputs); mean and 1/σ are not differentiable."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)

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
        ct = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        rstd = rstd.to(ct)
        grad_x = grad_w = grad_b = None
        g = grad_out.to(ct)
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(ct) if weight is not None else g
            grad_x = ((gw - gw.mean(-1, keepdim=True)) * rstd).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _sum_rows(g * (x.to(ct) - mean.to(ct)) * rstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _sum_rows(g).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None
