"""The GIM settings, their validation, and the choice of backend."""
from __future__ import annotations

import math
import os
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


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs: ``auto`` is ``triton`` on CUDA (float16/bfloat16/float32) and ``torch`` elsewhere.

    ``triton`` runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests); the kernels
    compute in float32, so float64 inputs need ``torch`` or ``eager``.
    """
    device = torch.device(device)
    if backend == "auto":
        usable = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        return "triton" if usable else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton); "
                             "use backend='torch' (row-chunked, any device) or 'eager'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, "
                             f"for tests), got tensors on {device}; use backend='torch' or 'auto'")
        if dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32 and takes float16, bfloat16 or float32 "
                             "inputs, got float64; use backend='torch' or 'eager' for float64")
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
