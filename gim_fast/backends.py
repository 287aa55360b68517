"""Which attention and norm backend runs: ``resolve_backend`` (``auto`` → ``triton`` on CUDA, ``torch`` elsewhere)."""
from __future__ import annotations

import os

import torch

from .settings import BACKENDS

__all__ = ["BACKENDS", "resolve_backend"]


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
