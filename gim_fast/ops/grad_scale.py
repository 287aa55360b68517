"""Identity in the forward pass, a constant factor on the gradient in the backward pass."""
from __future__ import annotations

import torch


class ScaleGrad(torch.autograd.Function):
    """y = x;  dx = scale · dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Return ``x`` whose gradient is multiplied by ``scale`` (``None`` or 1: unchanged)."""
    if scale is None or scale == 1.0:
        return x
    return ScaleGrad.apply(x, float(scale))
