"""ops.gated_product: the value of act(g) · u exactly, its gradient against autograd's in float64, for one
cotangent and for a vmapped stack; with torch's derivative ops (the glue's) and with the forward-mode fallback."""
from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from gim_fast import ops
from gim_fast.integration.gim import _activation_vjp

ACTIVATIONS = ["silu", "gelu_pytorch_tanh", "gelu", "relu", "gelu_new"]  # relu, gelu_new: the forward-mode fallback


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, u = (torch.randn(2, 7, 13, dtype=torch.float64, generator=gen).requires_grad_(True) for _ in range(2))
    stack = torch.randn(5, 2, 7, 13, dtype=torch.float64, generator=gen)
    return g, u, stack


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("known", [True, False], ids=["derivative-op", "forward-mode"])
def test_gated_product_matches_autograd(name, known):
    act = ACT2FN[name]
    act_vjp = _activation_vjp(act) if known else None
    if known and name in ("relu", "gelu_new"):
        assert act_vjp is None  # not one of the supported families' activations: forward mode
    g, u, stack = _inputs()
    ref_out = act(g) * u
    out = ops.gated_product(act, g, u, act_vjp)
    assert torch.equal(out, ref_out)  # the forward is the expression itself
    for m in range(2):  # one cotangent
        ref = torch.autograd.grad(ref_out, (g, u), stack[m], retain_graph=True)
        got = torch.autograd.grad(out, (g, u), stack[m], retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    ref = torch.func.vmap(lambda c: torch.autograd.grad(ref_out, (g, u), c, retain_graph=True))(stack)
    got = torch.func.vmap(lambda c: torch.autograd.grad(out, (g, u), c, retain_graph=True))(stack)
    for a, b in zip(got, ref):  # the stack: A = u ⊙ act'(g) once, then one multiplication per cotangent
        assert a.shape == b.shape == (5, 2, 7, 13)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
