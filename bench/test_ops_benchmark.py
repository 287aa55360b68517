"""pytest-benchmark micro-benchmarks of the ops (``pytest bench --benchmark-only``; CPU-sized shapes, or
realistic ones on CUDA). Forward + backward of GIM attention per backend next to SDPA, and the frozen norms."""
from __future__ import annotations

import pytest
import torch

import gim_fast

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SEQ, HEADS, KV_HEADS, DIM = (4096, 32, 8, 128) if CUDA else (256, 8, 2, 64)
ATTN_BACKENDS = ["torch", "eager"] + (["triton"] if CUDA else [])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _qkv():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    make = lambda h: torch.randn(1, h, SEQ, DIM, device=DEVICE, dtype=DTYPE, generator=g,  # noqa: E731
                                 requires_grad=True)
    return make(HEADS), make(KV_HEADS), make(KV_HEADS)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_gim_attention_fwd_bwd(benchmark, backend):
    q, k, v = _qkv()

    def run():
        out = gim_fast.ops.gim_attention(q, k, v, backend=backend)
        torch.autograd.grad(out.sum(), (q, k, v))
        _sync()

    benchmark(run)


def test_sdpa_fwd_bwd(benchmark):
    q, k, v = _qkv()

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out.sum(), (q, k, v))
        _sync()

    benchmark(run)


@pytest.mark.parametrize("kind", ["rms", "rms_gemma", "layer"])
@pytest.mark.parametrize("backend", ["torch", "eager"] + (["triton"] if CUDA else []))
def test_frozen_norm_fwd_bwd(benchmark, kind, backend):
    hidden = 4096 if CUDA else 576
    x = torch.randn(SEQ, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = torch.randn(hidden, device=DEVICE, dtype=DTYPE)
    b = torch.randn(hidden, device=DEVICE, dtype=DTYPE)

    def run():
        if kind == "layer":
            y = gim_fast.ops.frozen_layer_norm(x, w, b, 1e-5, backend=backend)
        else:
            y = gim_fast.ops.frozen_rms_norm(x, w, 1e-6, offset=1.0 if kind == "rms_gemma" else 0.0,
                                             backend=backend)
        torch.autograd.grad(y.sum(), x)
        _sync()

    benchmark(run)
