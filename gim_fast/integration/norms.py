"""The frozen-statistic forward that replaces a norm module's own, for every norm kind of ``families``."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import ops
from .families import Family

__all__ = ["frozen_norm_forward"]


def frozen_norm_forward(module: nn.Module, family: Family, backend: str) -> Callable:
    """``x -> norm(x)`` with the same value as ``module``'s own forward and the frozen-statistic backward
    (``ops.frozen_layer_norm`` / ``ops.frozen_rms_norm``, offset 1 for Gemma's ``(1 + w)``)."""
    if family.norm_kind == "layer":
        if len(module.normalized_shape) != 1:
            raise ValueError(f"frozen LayerNorm supports normalisation over the last dim only, got "
                             f"{module.normalized_shape}")
        return lambda x: ops.frozen_layer_norm(x, module.weight, module.bias, module.eps, backend=backend)
    offset = 1.0 if family.norm_kind == "rms_gemma" else 0.0
    eps = getattr(module, family.norm_eps_attr)
    return lambda x: ops.frozen_rms_norm(x, module.weight, eps, offset=offset, backend=backend)
