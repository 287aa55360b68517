"""End-to-end ``explain`` with the fused Triton kernels (``backend="triton"``) on tiny models of all seven families:
equal to the eager reference. Runs the real kernels on CUDA, the interpreter on the CPU (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

import gim_fast
from tiny_models import FAMILIES, random_ids, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_equals_eager(family):
    model = tiny_model(family, torch.float32).to(DEVICE)
    ids = random_ids(37, batch=2, seed=4).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding: rows with no visible key inside the kernel
    triton = gim_fast.explain(model, ids, attention_mask=mask, baseline_token_id=0, backend="triton")
    eager = gim_fast.explain(model, ids, attention_mask=mask, baseline_token_id=0, backend="eager")
    assert float((triton - eager).abs().max() / eager.abs().max()) <= 1e-4


def test_auto_is_triton_on_cuda_only():
    from gim_fast.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert resolve_backend("auto", torch.device(DEVICE), torch.bfloat16) == expected
    assert resolve_backend("auto", torch.device(DEVICE), torch.float64) == "torch"
