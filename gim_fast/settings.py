"""The GIM settings, their validation, and the choice of backend."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "eager", "torch", "triton")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_temperature(value):
    """``None`` (off) or a finite number > 0; 1.0 is the plain gradient."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"softmax_temperature must be a number > 0 or None (off), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"softmax_temperature must be a finite number > 0 or None (off), got {value!r}")
    return float(value)


def check_scale(name: str, value):
    """``None`` (off) or a finite number >= 0."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{name} must be a number >= 0 or None (off), got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None (off), got {value!r}")
    return float(value)


def check_backend(value) -> str:
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {value!r}")
    return value


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → ``torch`` (the row-chunked backend) until the Triton kernels land."""
    if backend == "auto":
        return "torch"
    if backend == "triton":
        raise ValueError(
            "backend='triton' is not available in this version of gim_fast yet; "
            "use backend='torch' (row-chunked, any device) or 'eager' (materialised reference)")
    return backend


@dataclass(frozen=True)
class GIMSettings:
    """Every GIM knob; ``None`` turns a modification off. With all off the backward is plain autograd."""

    freeze_norm: bool = True
    softmax_temperature: float | None = 2.0
    q_scale: float | None = 0.25
    k_scale: float | None = 0.25
    v_scale: float | None = 0.5
    gate_scale: float | None = 0.5
    up_scale: float | None = 0.5
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.freeze_norm, bool):
            raise TypeError(f"freeze_norm must be True or False, got {self.freeze_norm!r}")
        object.__setattr__(self, "softmax_temperature", check_temperature(self.softmax_temperature))
        for name in ("q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"):
            object.__setattr__(self, name, check_scale(name, getattr(self, name)))
        check_backend(self.backend)
