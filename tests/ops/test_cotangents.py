"""GIM's ops under ``torch.func.vmap`` over their cotangents (what ``explain_answer`` runs): a stack of C cotangents
gives, to float rounding, what C separate backward passes give — every backend, odd shapes, GQA, padding, sliding
windows, soft-capping — and explain_answer runs one forward per layer and one batched backward per chunk."""
from __future__ import annotations

import math

import pytest
import torch

import gim_fast
from gim_fast import ops
from tiny_models import random_ids, tiny_model

COTANGENTS = 3


def stacked_and_looped(fn, inputs, cotangents):
    """(vmap over autograd.grad, a Python loop of autograd.grad) of ``fn(*inputs)`` for each cotangent."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    batched = torch.func.vmap(lambda c: torch.autograd.grad(out, inputs, c, retain_graph=True))(cotangents)
    looped = [torch.stack(g) for g in zip(*(torch.autograd.grad(out, inputs, c, retain_graph=True)
                                             for c in cotangents))]
    return batched, looped


def rel_err(a, b):
    """Relative to the reference's largest entry, or absolute below 1 (a one-token dq is exactly 0 one way and
    rounding-level the other)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


ATTENTION_CASES = {
    # name: (batch, q heads, kv heads, seq, head dim, kwargs)
    "causal, SDPA fast path": (1, 4, 2, 37, 16, {}),
    "one token": (1, 2, 1, 1, 16, {}),
    "head dim 80, MHA": (2, 3, 3, 37, 80, {}),
    "padding": (2, 4, 2, 37, 16, dict(key_padding_mask="left")),
    "sliding window": (1, 6, 2, 130, 16, dict(sliding_window=7)),
    "soft-capping": (1, 4, 2, 37, 16, dict(softcap=1.5)),
    "temperature 3, no scales": (1, 4, 1, 37, 16, dict(temperature=3.0, q_scale=None, k_scale=None, v_scale=None)),
    "temperature off": (1, 4, 2, 37, 16, dict(temperature=None)),
}


def attention_inputs(batch, q_heads, kv_heads, seq, head_dim, kwargs, dtype):
    g = torch.Generator().manual_seed(seq + head_dim)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=dtype)
    kwargs = dict(kwargs)
    if kwargs.get("key_padding_mask") == "left":
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[0, :seq // 3] = False
        kwargs["key_padding_mask"] = mask
    cotangents = torch.randn(COTANGENTS, batch, q_heads, seq, head_dim, generator=g, dtype=dtype)
    return (q, k, v), kwargs, cotangents


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_attention_stack_equals_separate_backwards(case, backend):
    *shape, kwargs = ATTENTION_CASES[case]
    # float32 keeps the torch backend on its SDPA fast path where the structure allows; float64 checks the chunked
    # path's math tightly
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        inputs, kw, cotangents = attention_inputs(*shape, kwargs, dtype)
        batched, looped = stacked_and_looped(lambda q, k, v: ops.gim_attention(q, k, v, backend=backend, **kw),
                                             inputs, cotangents)
        for b, loop, name in zip(batched, looped, "qkv"):
            assert rel_err(b, loop) <= tol, (name, dtype)


@pytest.mark.parametrize("case", ["padding", "soft-capping"])  # windows: test_answers' triton test (Qwen, Mistral)
def test_triton_attention_stack_equals_separate_backwards(case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    *shape, kwargs = ATTENTION_CASES[case]
    inputs, kw, cotangents = attention_inputs(*shape[:3], 33, shape[4], kwargs, torch.float32)
    inputs = [x.to(device) for x in inputs]
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    batched, looped = stacked_and_looped(lambda q, k, v: ops.gim_attention(q, k, v, backend="triton", **kw),
                                         inputs, cotangents.to(device))
    for b, loop, name in zip(batched, looped, "qkv"):
        assert rel_err(b, loop) <= 1e-6, name


def test_chunked_stack_against_the_formula():
    """The batched chunked backward against the GIM rule written out per cotangent (float64, several tiles)."""
    from gim_fast.ops.attention_chunked import attention_backward, attention_forward

    (q, k, v), _, cotangents = attention_inputs(1, 4, 2, 70, 16, {}, torch.float64)
    scale, t = 1 / math.sqrt(16), 2.0
    shape = dict(scale=scale, causal=True, sliding_window=None, softcap=None, key_padding_mask=None, chunk_size=16)
    out, lse = attention_forward(q, k, v, **shape)
    got = attention_backward(cotangents, q, k, v, out, lse, temperature=t, q_scale=0.25, k_scale=0.25, v_scale=0.5,
                             **shape)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kr.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), float("-inf"))
    p, p_t = s.softmax(-1), (s / t).softmax(-1)
    for c, do in enumerate(cotangents):
        dp = do @ vr.transpose(-1, -2)
        ds = p_t * (dp - (dp * p_t).sum(-1, keepdim=True))
        dq = 0.25 * scale * ds @ kr
        dk = (0.25 * scale * ds.transpose(-1, -2) @ q).view(1, 2, 2, 70, 16).sum(2)
        dv = (0.5 * p.transpose(-1, -2) @ do).view(1, 2, 2, 70, 16).sum(2)
        for g, ref in zip(got, (dq, dk, dv)):
            assert rel_err(g[c], ref) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "eager", "triton"])
def test_norm_stacks_equal_separate_backwards(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 80, generator=g, dtype=dtype).to(device)
    w = torch.randn(80, generator=g, dtype=dtype).to(device)
    b = torch.randn(80, generator=g, dtype=dtype).to(device)
    cotangents = torch.randn(COTANGENTS, 2, 5, 80, generator=g, dtype=dtype).to(device)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for fn in (lambda x: ops.frozen_rms_norm(x, w, 1e-6, backend=backend),
               lambda x: ops.frozen_rms_norm(x, w, 1e-6, offset=1.0, backend=backend),
               lambda x: ops.frozen_layer_norm(x, w, b, 1e-5, backend=backend)):
        (batched,), (looped,) = stacked_and_looped(fn, [x], cotangents)
        assert rel_err(batched, looped) <= tol


def test_one_forward_and_one_batched_backward_per_chunk(monkeypatch):
    """M targets: each layer's attention runs forward once, and backward once per chunk of cotangents."""
    from gim_fast.ops import attention_chunked

    model = tiny_model("llama")  # 2 layers
    forwards, stacks = [], []
    original_forward, original_backward = ops.gim_attention, attention_chunked.attention_backward
    monkeypatch.setattr(ops, "gim_attention", lambda *a, **k: forwards.append(1) or original_forward(*a, **k))
    monkeypatch.setattr(attention_chunked, "attention_backward",
                        lambda grad, *a, **k: stacks.append(grad.shape[0] if grad.dim() == 5 else None)
                        or original_backward(grad, *a, **k))
    gim_fast.explain_answer(model, random_ids(20, seed=1), random_ids(7, seed=2), baseline_token_id=0, chunk=3)
    assert len(forwards) == 2
    assert stacks == [3, 3, 3, 3, None, None]  # the last target alone goes back without vmap, one cotangent
