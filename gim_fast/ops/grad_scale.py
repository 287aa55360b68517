"""Identity in the forward pass, a constant factor on the gradient in the backward pass."""
from __future__ import annotations

import torch

from .cotangents import unbatched_forward_only


class ScaleGrad(torch.autograd.Function):
    """y = x;  dx = scale · dy."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Return ``x`` whose gradient is multiplied by ``scale`` (``None`` or 1: unchanged)."""
    if scale is None or scale == 1.0:
        return x
    return ScaleGrad.apply(x, float(scale))
