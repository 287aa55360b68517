"""The routes inside the ``torch`` backend of ``gim_attention`` (``gim_fast/ops/attention_chunked.py``).

The fused-forward route (torch's CPU flash attention, which also returns the row LSE, then the row-tiled GIM
backward from that LSE), the tiled route (padding, windows, soft-capping, float64), the backward without a saved
LSE (what a non-CPU device's fused forward leaves) and the backward of M cotangents at once must all give the
float64 reference of ``tests/ops/test_ops.py`` (materialised attention, GIM by autograd identities) to float
rounding. Tolerances: ``ATTN_TOL`` of test_ops (max|Δ| / max|ref|).
"""
from __future__ import annotations

import math

import pytest
import torch

from gim_fast.ops import attention_chunked as ac
from gim_fast.ops.masks import allowed_tile
from test_ops import ATTN_TOL, assert_rel, make_case, reference_run, run_backward

# (B, Hq, Hkv, S, D): seq 1, 37, 130; GQA 3:1 and 2:1, MHA; head dim 16, 64, 80
FUSED_SHAPES = [(1, 3, 1, 1, 16), (2, 6, 2, 37, 80), (1, 3, 3, 130, 64), (1, 4, 2, 130, 80)]


def gim(q, k, v, **kw):
    return ac.gim_attention_chunked(
        q, k, v, scale=kw.get("scale") or 1.0 / math.sqrt(q.shape[-1]), causal=kw.get("causal", True),
        sliding_window=kw.get("sliding_window"), softcap=kw.get("softcap"),
        key_padding_mask=kw.get("key_padding_mask"), temperature=kw.get("temperature", 2.0),
        q_scale=kw.get("q_scale", 0.25), k_scale=kw.get("k_scale", 0.25), v_scale=kw.get("v_scale", 0.5),
        chunk_size=kw.get("chunk_size"))


def structure(q, kw, chunk_size=None):
    return dict(scale=kw.get("scale") or 1.0 / math.sqrt(q.shape[-1]), causal=kw.get("causal", True),
                sliding_window=kw.get("sliding_window"), softcap=kw.get("softcap"),
                key_padding_mask=kw.get("key_padding_mask"),
                chunk_size=chunk_size or 16)


def settings(kw):
    return dict(temperature=kw.get("temperature", 2.0), q_scale=kw.get("q_scale", 0.25),
                k_scale=kw.get("k_scale", 0.25), v_scale=kw.get("v_scale", 0.5))


def check(q, k, v, dout, kw, fn=gim):
    out, grads = run_backward(lambda a, b, c: fn(a, b, c, **kw), [q, k, v], dout)
    ref_out, ref_grads = reference_run(q, k, v, dout, kw)
    tol = ATTN_TOL[q.dtype]
    assert_rel(out, ref_out, tol, "out")
    # seq 1: one key per row, dq and dk are exactly 0 in theory and torch's fused backward (T off) leaves
    # rounding noise there; it is measured against the largest gradient
    atol = tol * max(g.abs().max().item() for g in ref_grads) if q.shape[2] == 1 else 0.0
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype
        assert_rel(g, rg, tol, f"d{name}", atol=atol)


@pytest.mark.parametrize("temperature", [2.0, 0.5, None], ids=str)
@pytest.mark.parametrize("causal, padding", [(True, None), (False, None), (True, "left"), (False, "right")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_route_vs_reference(shape, dtype, causal, padding, temperature):
    q, k, v, dout, kw = make_case(shape, dict(causal=causal, padding=padding, temperature=temperature), dtype,
                                  seed=31)
    out, lse = ac.attention_forward(q, k, v, **structure(q, kw))
    assert lse is not None and lse.shape == q.shape[:3]  # the fused CPU forward ran and gave the LSE
    check(q, k, v, dout, kw)
    if padding == "left":  # a query row with no key (left padding, causal) outputs exactly 0
        empty = ~kw["key_padding_mask"].cumsum(-1).bool()  # [B, S]
        assert empty.any() and (out.permute(0, 2, 1, 3)[empty] == 0).all()


def test_fused_forward_lse_is_the_row_logsumexp():
    q, k, v, _, kw = make_case((1, 4, 2, 37, 16), {}, torch.float32, seed=2)
    out, lse = ac.attention_forward(q, k, v, **structure(q, kw))
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), -math.inf)
    assert_rel(lse, torch.logsumexp(s, -1), 1e-6, "lse")
    assert_rel(out, torch.softmax(s, -1) @ v.double().repeat_interleave(2, 1), 1e-5, "out")


@pytest.mark.parametrize("config", ["causal", "noncausal", "window3_leftpad", "rightpad_softcap", "T3_scales_odd"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_backward_without_saved_lse(config, chunk):
    """lse=None (a non-CPU fused forward gives none): each tile takes its rows' LSE from its own scores."""
    q, k, v, dout, kw = make_case((2, 6, 2, 37, 80), config, torch.float32, seed=5)
    st = structure(q, kw, chunk)
    _, lse = ac.attention_forward(q, k, v, **st)
    with_lse = ac.attention_backward(dout, q, k, v, None, lse, **st, **settings(kw))
    without = ac.attention_backward(dout, q, k, v, None, None, **st, **settings(kw))
    _, ref = reference_run(q, k, v, dout, kw)
    for name, a, b, r in zip("qkv", with_lse, without, ref):
        assert_rel(a, r, ATTN_TOL[torch.float32], f"d{name} (lse)")
        assert_rel(b, r, ATTN_TOL[torch.float32], f"d{name} (no lse)")


@pytest.mark.parametrize("config", ["causal", "softcap_window4_leftpad", "noncausal_leftpad_T0.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_of_many_cotangents(config, dtype):
    """grad_out [M, ...]: the M backwards of one forward (the stacked GEMMs and Δ = dO · O_T of
    ``_stacked_backward``), each equal to its own single-cotangent backward up to float rounding, and to the
    float64 reference."""
    q, k, v, _, kw = make_case((2, 6, 2, 37, 80), config, dtype, seed=8)
    douts = torch.randn((3,) + q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    st = structure(q, kw, 9)
    _, lse = ac.attention_forward(q, k, v, **st)
    stacked = ac.attention_backward(douts, q, k, v, None, lse, **st, **settings(kw))
    for m in range(3):
        single = ac.attention_backward(douts[m], q, k, v, None, lse, **st, **settings(kw))
        _, ref = reference_run(q, k, v, douts[m], kw)
        for name, many, one, r in zip("qkv", stacked, single, ref):
            assert many.shape == (3,) + one.shape
            assert_rel(many[m], one, 5e-6 if dtype == torch.float32 else 1e-2, f"d{name}[{m}] stacked vs one")
            assert_rel(many[m], r, ATTN_TOL[dtype], f"d{name}[{m}] stacked")
            assert_rel(one, r, ATTN_TOL[dtype], f"d{name}[{m}]")


@pytest.mark.parametrize("temperature", [2.0, None], ids=str)
def test_fused_ops_without_gqa_in_the_op(monkeypatch, temperature):
    """torch < 2.13: GQA is not used inside the CPU flash ops; K/V are repeated for them (and, in the fused
    backward of T off, dK/dV summed back over the group) and the result does not change."""
    q, k, v, dout, kw = make_case((1, 6, 2, 37, 16), dict(temperature=temperature), torch.float32, seed=4)
    native = run_backward(lambda a, b, c: gim(a, b, c, **kw), [q, k, v], dout)
    monkeypatch.setattr(ac, "_FLASH_CPU_GQA", False)
    repeated = run_backward(lambda a, b, c: gim(a, b, c, **kw), [q, k, v], dout)
    assert_rel(repeated[0], native[0], 1e-6, "out")
    for name, a, b in zip("qkv", repeated[1], native[1]):
        assert_rel(a, b, 1e-6, f"d{name}")


def test_fused_route_deterministic():
    q, k, v, dout, kw = make_case((1, 6, 2, 130, 80), {}, torch.float32, seed=6)
    first = run_backward(lambda a, b, c: gim(a, b, c, **kw), [q, k, v], dout)
    second = run_backward(lambda a, b, c: gim(a, b, c, **kw), [q, k, v], dout)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("causal, window, padded", [(True, None, False), (True, 1, False), (True, 5, False),
                                                    (True, 40, False), (False, None, False), (True, 3, True)])
def test_mask_spans_cover_every_masked_column(causal, window, padded):
    """Outside the spans ``_mask_spans`` returns, every row of the tile sees every key of its key range."""
    seq = 37
    for q_start, q_end in [(0, 7), (7, 14), (30, 37), (0, 37), (12, 13)]:
        lo, hi = ac.key_range(q_start, q_end, seq, causal, window)
        allowed = allowed_tile(q_start, q_end, lo, hi, causal=causal, sliding_window=window,
                               key_padding_mask=None, device=torch.device("cpu"))[0, 0]
        inside = torch.zeros(hi - lo, dtype=torch.bool)
        for a, b in ac._mask_spans(q_start, q_end, lo, hi, causal, window, padded):
            assert lo <= a < b <= hi
            inside[a - lo:b - lo] = True
        assert allowed[:, ~inside].all(), (q_start, q_end)
        if padded:
            assert inside.all()


def test_auto_chunk_size():
    assert ac.auto_chunk_size(1, 9, 3, 2048, None) == 32  # SmolLM2: 96 stacked rows per KV head
    assert ac.auto_chunk_size(1, 12, 12, 2048, None) == 96  # multi-head: 96 rows
    assert ac.auto_chunk_size(1, 9, 3, 1, None) == 1
    for batch, heads, kv, seq, window in [(1, 32, 8, 131072, None), (2, 9, 3, 40000, None), (1, 9, 3, 1 << 20, 1 << 17)]:
        positions = ac.auto_chunk_size(batch, heads, kv, seq, window)  # long context: the tile budget wins
        keys = seq if window is None else window + ac._MIN_POSITIONS
        assert 1 <= positions < ac._MIN_POSITIONS
        assert batch * heads * positions * keys <= max(ac._TILE_ELEMENTS, batch * heads * keys)


@pytest.mark.parametrize("config", ["causal", "rightpad_softcap"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 16), (1, 2, 2, 37, 16)], ids=str)
def test_inputs_untouched(shape, config):
    """No route writes into q, k, v, the saved LSE or the cotangent (some layouts are views of them)."""
    q, k, v, dout, kw = make_case(shape, config, torch.float32, seed=3)
    st = structure(q, kw, 7)
    before = [t.clone() for t in (q, k, v, dout)]
    _, lse = ac.attention_forward(q, k, v, **st)
    lse_before = lse.clone()
    ac.attention_backward(dout, q, k, v, None, lse, **st, **settings(kw))
    for name, a, b in zip(["q", "k", "v", "grad_out"], (q, k, v, dout), before):
        assert torch.equal(a, b), name
    assert torch.equal(lse, lse_before)


@pytest.mark.parametrize("padding", [None, "left"])
def test_plain_gradient_takes_the_fused_backward(monkeypatch, padding):
    """T off after the CPU flash forward: torch's fused backward, once per cotangent, equal to the reference."""
    calls = []
    fused = ac._FLASH_CPU_BACKWARD
    monkeypatch.setattr(ac, "_FLASH_CPU_BACKWARD", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    off = dict(temperature=None, q_scale=0.3, k_scale=None, v_scale=0.5, padding=padding)
    q, k, v, _, kw = make_case((2, 6, 2, 37, 80), off, torch.float32, seed=12)
    douts = torch.randn((2,) + q.shape, generator=torch.Generator().manual_seed(2))
    st = structure(q, kw)
    out, lse = ac.attention_forward(q, k, v, **st)
    stacked = ac.attention_backward(douts, q, k, v, out, lse, **st, **settings(kw))
    assert len(calls) == 2
    for m in range(2):
        _, ref = reference_run(q, k, v, douts[m], kw)
        for name, g, r in zip("qkv", stacked, ref):
            assert_rel(g[m], r, ATTN_TOL[torch.float32], f"d{name}[{m}]")
    check(q, k, v, douts[0], kw)  # through autograd: the Function keeps the output for this route
    assert len(calls) == 3


@pytest.mark.parametrize("temperature", [2.0, None], ids=str)
@pytest.mark.parametrize("config", [{}, dict(causal=False), dict(padding="left")], ids=str)
def test_generic_route_without_the_cpu_flash_op(monkeypatch, config, temperature):
    """Where torch's CPU flash op is not used (another device): the forward is scaled_dot_product_attention (no
    LSE; with padding the tiles), and the backward tiles take P from their own scores."""
    monkeypatch.setattr(ac, "_FLASH_CPU", None)
    q, k, v, dout, kw = make_case((2, 6, 2, 37, 80), dict(config, temperature=temperature), torch.float32, seed=13)
    _, lse = ac.attention_forward(q, k, v, **structure(q, kw))
    assert (lse is None) == (kw["key_padding_mask"] is None)
    check(q, k, v, dout, kw)


@pytest.mark.parametrize("config", [dict(), dict(temperature=None), dict(padding="left"), dict(sliding_window=700),
                                    dict(softcap=2.0)], ids=str)
def test_no_score_matrix_is_allocated(config):
    """O(S) memory: no allocation during forward + backward comes near one B·Hq·S·S float32 score matrix."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, dout, kw = make_case((1, 2, 1, 2048, 16), config, torch.float32, seed=14)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gim(*leaves, **kw).backward(dout)
    largest = max(e.cpu_memory_usage for e in prof.events())
    score_matrix = 2 * 2048 * 2048 * 4
    assert 0 < largest < score_matrix / 4, largest
