"""Tests of ``gim_fast.ops`` against independent references written here, in plain float64 autograd.

Nothing below takes an expected value from the code under test. The references:

* attention: the attention matrix materialised in float64, GQA by ``repeat_interleave``, the mask built
  from its definition, a masked softmax written out by hand. The GIM backward comes from autograd alone,
  through the identity "the GIM softmax rule is T × the true gradient of softmax(S/T)":

      O = P.detach() @ V  +  T · (P_T − P_T.detach()) @ V.detach()

  Its value is P @ V exactly (the second term is exactly zero); V receives Pᵀ dO (true P); S receives
  T · VJP of softmax(S/T) at dP = dO Vᵀ, i.e. P_T ⊙ (dP − rowsum(dP ⊙ P_T)). The q/k/v factors come from
  ``x.detach() + s · (x − x.detach())`` (value x exactly, gradient s). The reference itself is checked
  against the same backward written out as explicit matrix formulas (``test_reference_matches_explicit_formula``).
* norms: the Hugging Face modules for the forward (bit for bit), the frozen-statistic formulas by hand in
  float64 for dx, plain autograd for the weight/bias gradients.

Tolerances are max|actual − reference| / max|reference| unless a test says "bit-identical".
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gim_fast.ops as ops
from gim_fast.ops.attention_chunked import gim_attention_chunked

# max|Δ| / max|ref| allowed, by input dtype (the ops compute in float32 for float32/16-bit inputs).
ATTN_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NORM_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected| (0/0 = 0, x/0 = inf)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    ref = expected.double().abs().max().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def assert_rel(actual, expected, tol, what="", atol=0.0):
    """max|Δ| <= tol · max|ref| + atol (atol only where a reference can be a rounding-level 'zero')."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    ref = expected.double().abs().max().item() if expected.numel() else 0.0
    assert diff <= tol * ref + atol, f"{what}: max|Δ| = {diff:.3e}, max|ref| = {ref:.3e}, rel tol {tol:.1e}"


def randn(shape, dtype, seed, mult=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * mult).to(dtype)


def run_backward(fn, tensors, grad_out):
    """Fresh leaves from ``tensors``; returns (output, [grads])."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


# ----------------------------------------------------------------------------------------------------------
# float64 reference attention
# ----------------------------------------------------------------------------------------------------------

def ref_allowed(batch, seq, causal, sliding_window, key_padding_mask):
    """[B, 1, S, S] bool, straight from the definitions: j <= i; i − w < j; key j is a real token."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = torch.ones(batch, seq, seq, dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i)
    if sliding_window is not None:
        allowed = allowed & (j > i - sliding_window)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed[:, None]


def masked_softmax(s, allowed):
    """softmax over allowed entries; a row with none allowed is all zeros with zero gradient."""
    m = torch.where(allowed, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # shift invariance: any constant is exact
    e = torch.where(allowed, torch.exp(torch.where(allowed, s - m, torch.zeros_like(s))), torch.zeros_like(s))
    denom = e.sum(-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def grad_scaled(x, s):
    """Value x (exactly), gradient s · dy."""
    return x if s is None else x.detach() + s * (x - x.detach())


def reference_attention(q, k, v, *, scale=None, causal=True, sliding_window=None, softcap=None,
                        key_padding_mask=None, temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5):
    """float64 GIM attention by autograd; q [B,Hq,S,D], k/v [B,Hkv,S,D] (float64 leaves)."""
    assert q.dtype == torch.float64
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = grad_scaled(q, q_scale)
    k = grad_scaled(k, k_scale).repeat_interleave(group, dim=1)
    v = grad_scaled(v, v_scale).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = ref_allowed(b, s, causal, sliding_window, key_padding_mask)
    p = masked_softmax(scores, allowed)
    if temperature is None:
        return p @ v
    p_t = masked_softmax(scores / temperature, allowed)
    return p.detach() @ v + temperature * (p_t - p_t.detach()) @ v.detach()


def explicit_backward(q, k, v, dout, *, scale=None, causal=True, sliding_window=None, softcap=None,
                      key_padding_mask=None, temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5):
    """The same GIM backward written as matrix formulas (no autograd), float64. Returns dq, dk, dv."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    raw = (q @ kr.transpose(-1, -2)) * scale
    sc = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
    allowed = ref_allowed(b, s, causal, sliding_window, key_padding_mask).expand(b, hq, s, s)
    p = torch.zeros_like(sc)
    p_t = torch.zeros_like(sc)
    t = 1.0 if temperature is None else temperature
    for idx in torch.nonzero(allowed.any(-1)).tolist():  # row by row, plain exp/sum
        bi, hi, i = idx
        cols = allowed[bi, hi, i]
        row = sc[bi, hi, i, cols]
        e = torch.exp(row - row.max())
        p[bi, hi, i, cols] = e / e.sum()
        e_t = torch.exp(row / t - (row / t).max())
        p_t[bi, hi, i, cols] = e_t / e_t.sum()
    dp = dout @ vr.transpose(-1, -2)
    ds = p_t * (dp - (dp * p_t).sum(-1, keepdim=True))
    if softcap is not None:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    ds = ds * scale
    dq = ds @ kr
    dk = (ds.transpose(-1, -2) @ q).view(b, hkv, group, s, d).sum(2)
    dv = (p.transpose(-1, -2) @ dout).view(b, hkv, group, s, d).sum(2)
    f = lambda x: 1.0 if x is None else x  # noqa: E731
    return dq * f(q_scale), dk * f(k_scale), dv * f(v_scale)


# ----------------------------------------------------------------------------------------------------------
# attention: cases
# ----------------------------------------------------------------------------------------------------------

# (B, Hq, Hkv, S, D): GQA 1:1, 3:1, 2:1, MQA (Hkv = 1); seq 1, 5, 37; head dim 16 and 80
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 1, 5, 16),
    (2, 2, 2, 37, 16),
    (1, 3, 1, 37, 80),
    (2, 6, 2, 5, 80),
    (2, 3, 3, 37, 80),
]


def padding_mask(batch, seq, kind):
    """bool [B, S], True = real token. Batch row 0 is padded, row 1 (if any) less so."""
    if kind is None:
        return None
    mask = torch.ones(batch, seq, dtype=torch.bool)
    for bi in range(batch):
        n_pad = max(1, seq // 3) if bi == 0 else seq // 5
        if kind == "left":
            mask[bi, :n_pad] = False
        elif kind == "right":
            mask[bi, seq - n_pad:] = False
            mask[bi, 0] = True  # keep one real token
        else:
            raise ValueError(kind)
    return mask


# name -> attention kwargs (padding given by kind, turned into a mask per shape)
CONFIGS = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "window1": dict(sliding_window=1),
    "window3_leftpad": dict(sliding_window=3, padding="left"),
    "rightpad_softcap": dict(padding="right", softcap=2.0),
    "noncausal_leftpad_T0.5": dict(causal=False, padding="left", temperature=0.5),
    "softcap_window4_leftpad": dict(softcap=1.5, sliding_window=4, padding="left", scale=0.3),
    "plain_grad_T_none": dict(temperature=None, q_scale=None, k_scale=None, v_scale=None, padding="right"),
    "T3_scales_odd": dict(temperature=3.0, q_scale=0.3, k_scale=1.7, v_scale=0.0),
}


def make_case(shape, config, dtype, seed=0):
    b, hq, hkv, s, d = shape
    kw = dict(CONFIGS[config]) if isinstance(config, str) else dict(config)
    kw["key_padding_mask"] = padding_mask(b, s, kw.pop("padding", None))
    q = randn((b, hq, s, d), dtype, seed, mult=2.0)  # ×2: peakier softmax, so T matters
    k = randn((b, hkv, s, d), dtype, seed + 1, mult=2.0)
    v = randn((b, hkv, s, d), dtype, seed + 2)
    dout = randn((b, hq, s, d), dtype, seed + 3)
    return q, k, v, dout, kw


def op_under_test(backend):
    """A callable (q, k, v, **kw) for a backend name; 'chunkN' is the internal row-chunked op with chunk N."""
    if backend.startswith("chunk"):
        chunk = int(backend[len("chunk"):])

        def call(q, k, v, *, scale=None, causal=True, sliding_window=None, softcap=None, key_padding_mask=None,
                 temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5):
            return gim_attention_chunked(
                q, k, v, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal=causal,
                sliding_window=sliding_window, softcap=softcap, key_padding_mask=key_padding_mask,
                temperature=temperature, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, chunk_size=chunk)
        return call
    return lambda q, k, v, **kw: ops.gim_attention(q, k, v, backend=backend, **kw)


def reference_run(q, k, v, dout, kw):
    return run_backward(lambda a, b_, c: reference_attention(a, b_, c, **kw),
                        [q.double(), k.double(), v.double()], dout.double())


BACKENDS = ["eager", "torch", "chunk4", "chunk7"]


def check_against_reference(backend, shape, config, dtype):
    q, k, v, dout, kw = make_case(shape, config, dtype)
    fn = op_under_test(backend)
    out, (dq, dk, dv) = run_backward(lambda a, b_, c: fn(a, b_, c, **kw), [q, k, v], dout)
    ref_out, (rdq, rdk, rdv) = reference_run(q, k, v, dout, kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    tol = ATTN_TOL[dtype]
    assert_rel(out, ref_out, tol, "out")
    assert_rel(dq, rdq, tol, "dq")
    assert_rel(dk, rdk, tol, "dk")
    assert_rel(dv, rdv, tol, "dv")

    # Structure, exactly: a query row with no allowed key outputs 0 and its dq is 0; a padded key gets no dk/dv.
    mask = kw["key_padding_mask"]
    allowed = ref_allowed(q.shape[0], q.shape[2], kw.get("causal", True), kw.get("sliding_window"), mask)
    empty_rows = ~allowed.any(-1)[:, 0]  # [B, S]
    if empty_rows.any():
        assert (out.permute(0, 2, 1, 3)[empty_rows] == 0).all()
        assert (dq.permute(0, 2, 1, 3)[empty_rows] == 0).all()
    if mask is not None and (~mask).any():
        assert (dk.permute(0, 2, 1, 3)[~mask] == 0).all()
        assert (dv.permute(0, 2, 1, 3)[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# attention: tests
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=str)
def test_reference_matches_explicit_formula(shape, config):
    """The autograd reference (identity-based) equals the GIM backward written out as formulas."""
    q, k, v, dout, kw = make_case(shape, config, torch.float64, seed=11)
    _, (rdq, rdk, rdv) = reference_run(q, k, v, dout, kw)
    edq, edk, edv = explicit_backward(q, k, v, dout, **kw)
    assert_rel(rdq, edq, 1e-12, "dq")
    assert_rel(rdk, edk, 1e-12, "dk")
    assert_rel(rdv, edv, 1e-12, "dv")


def test_reference_temperature_changes_gradient():
    """Sanity of the reference: T = 2 and T = None give different dq (else the tests would prove nothing)."""
    q, k, v, dout, kw = make_case(SHAPES[3], "causal", torch.float64)
    _, (dq2, _, dv2) = reference_run(q, k, v, dout, dict(kw, temperature=2.0))
    _, (dq1, _, dv1) = reference_run(q, k, v, dout, dict(kw, temperature=None))
    assert rel_err(dq2, dq1) > 1e-2
    assert torch.allclose(dv2, dv1, rtol=0, atol=1e-14)  # dV keeps the true P


# Every shape × config on eager, torch and chunk 7; the slowest (chunk 4) on two shapes.
FLOAT64_CASES = [(b, s) for b in ["eager", "torch", "chunk7"] for s in SHAPES] + [
    ("chunk4", SHAPES[1]), ("chunk4", SHAPES[3])]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend, shape", FLOAT64_CASES, ids=str)
def test_attention_float64_vs_reference(backend, shape, config):
    check_against_reference(backend, shape, config, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["softcap_window4_leftpad", "noncausal_leftpad_T0.5", "T3_scales_odd"])
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4]], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_low_precision_vs_reference(backend, shape, config, dtype):
    check_against_reference(backend, shape, config, dtype)


def test_attention_auto_backend_vs_reference():
    check_against_reference("auto", SHAPES[3], "softcap_window4_leftpad", torch.float32)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("padding", [None, "right"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_settings_equal_sdpa(backend, shape, padding, window):
    """temperature=None and all scales None: the gradient of stock SDPA (float64)."""
    b, hq, hkv, s, d = shape
    q, k, v, dout, _ = make_case(shape, {}, torch.float64, seed=5)
    mask = padding_mask(b, s, padding)
    group = hq // hkv

    def sdpa(q_, k_, v_):
        k_, v_ = k_.repeat_interleave(group, 1), v_.repeat_interleave(group, 1)
        if window is None and mask is None:
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        allowed = (j <= i)[None, None]
        if window is not None:
            allowed = allowed & (j > i - window)
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=allowed)

    fn = op_under_test(backend)
    plain = dict(temperature=None, q_scale=None, k_scale=None, v_scale=None, sliding_window=window,
                 key_padding_mask=mask)
    out, grads = run_backward(lambda a, b_, c: fn(a, b_, c, **plain), [q, k, v], dout)
    ref_out, ref_grads = run_backward(sdpa, [q, k, v], dout)
    # atol: with sliding_window=1 dq, dk are exactly 0 in theory; SDPA's are rounding noise (~1e-16)
    assert_rel(out, ref_out, 1e-10, "out", atol=1e-13)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_rel(g, rg, 1e-10, f"d{name}", atol=1e-13)
    # T = 1 and scales 1.0 are the same as off
    ones = dict(plain, temperature=1.0, q_scale=1.0, k_scale=1.0, v_scale=1.0)
    _, grads1 = run_backward(lambda a, b_, c: fn(a, b_, c, **ones), [q, k, v], dout)
    for name, g, rg in zip("qkv", grads1, ref_grads):
        assert_rel(g, rg, 1e-10, f"d{name} (T=1, scales 1)", atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_linearity(backend, dtype):
    """dq, dk, dv scale exactly by q_scale, k_scale, v_scale; the output and the other gradients do not move."""
    q, k, v, dout, kw = make_case(SHAPES[4], "softcap_window4_leftpad", dtype, seed=3)
    fn = op_under_test(backend)

    def grads(**scales):
        return run_backward(lambda a, b_, c: fn(a, b_, c, **dict(kw, **scales)), [q, k, v], dout)

    out1, (dq1, dk1, dv1) = grads(q_scale=1.0, k_scale=1.0, v_scale=1.0)
    out2, (dq2, dk2, dv2) = grads(q_scale=0.25, k_scale=0.25, v_scale=0.5)
    assert torch.equal(out1, out2)
    assert dq1.abs().max() > 0 and dk1.abs().max() > 0 and dv1.abs().max() > 0
    assert torch.equal(dq2, dq1 * 0.25)  # powers of two: exact
    assert torch.equal(dk2, dk1 * 0.25)
    assert torch.equal(dv2, dv1 * 0.5)

    _, (dq3, dk3, dv3) = grads(q_scale=0.3, k_scale=1.0, v_scale=1.0)  # only q's factor changes
    assert_rel(dq3, dq1 * 0.3, 1e-6 if dtype == torch.float32 else 1e-2, "dq(0.3)")
    assert torch.equal(dk3, dk1) and torch.equal(dv3, dv1)

    _, (dq0, dk0, dv0) = grads(q_scale=0.0, k_scale=0.0, v_scale=0.0)
    assert (dq0 == 0).all() and (dk0 == 0).all() and (dv0 == 0).all()

    _, (dqn, dkn, dvn) = grads(q_scale=None, k_scale=None, v_scale=None)
    assert torch.equal(dqn, dq1) and torch.equal(dkn, dk1) and torch.equal(dvn, dv1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_unchanged_by_gim_settings(backend):
    """The forward is the model's own: bit-identical whatever the temperature and scales."""
    q, k, v, _, kw = make_case(SHAPES[3], "softcap_window4_leftpad", torch.float32, seed=4)
    fn = op_under_test(backend)
    plain = fn(q, k, v, **dict(kw, temperature=None, q_scale=None, k_scale=None, v_scale=None))
    for t in (2.0, 0.5, 7.0):
        assert torch.equal(fn(q, k, v, **dict(kw, temperature=t)), plain)


PAIR_CONFIGS = {
    "leftpad": dict(padding="left"),
    "rightpad": dict(padding="right"),
    "window5": dict(sliding_window=5),
    "softcap": dict(softcap=1.5),
    "all": dict(padding="left", sliding_window=6, softcap=2.0, temperature=2.5),
    "noncausal_rightpad": dict(causal=False, padding="right", softcap=3.0),
}


@pytest.mark.parametrize("config", list(PAIR_CONFIGS))
@pytest.mark.parametrize("shape", [(2, 3, 1, 37, 80)], ids=str)
def test_backends_agree_float32(shape, config):
    q, k, v, dout, kw = make_case(shape, PAIR_CONFIGS[config], torch.float32, seed=9)
    results = {}
    for backend in ["eager", "torch", "chunk4", "chunk7"]:
        fn = op_under_test(backend)
        results[backend] = run_backward(lambda a, b_, c: fn(a, b_, c, **kw), [q, k, v], dout)
    base_out, base_grads = results["eager"]
    for backend, (out, grads) in results.items():
        assert_rel(out, base_out, 1e-5, f"{backend} out")
        for name, g, bg in zip("qkv", grads, base_grads):
            assert_rel(g, bg, 1e-5, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["torch", "chunk4", "chunk7"])
def test_torch_backend_deterministic(backend):
    q, k, v, dout, kw = make_case((2, 6, 2, 37, 80), "softcap_window4_leftpad", torch.float32, seed=21)
    fn = op_under_test(backend)
    out1, g1 = run_backward(lambda a, b_, c: fn(a, b_, c, **kw), [q, k, v], dout)
    out2, g2 = run_backward(lambda a, b_, c: fn(a, b_, c, **kw), [q, k, v], dout)
    assert torch.equal(out1, out2)
    for a, b_ in zip(g1, g2):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, dtype):
    """q from a [B,S,H,D] tensor, k/v sliced out of one fused [B,S,2,Hkv,D] tensor, all via transpose(1, 2)."""
    b, hq, hkv, s, d = 2, 6, 2, 37, 16
    fn = op_under_test(backend)
    kw = dict(sliding_window=9, key_padding_mask=padding_mask(b, s, "left"), softcap=2.0)
    q_bshd = randn((b, s, hq, d), dtype, 30, mult=2.0).requires_grad_(True)
    kv = randn((b, s, 2, hkv, d), dtype, 31, mult=2.0).requires_grad_(True)
    q, k, v = q_bshd.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    dout = randn((b, hq, s, d), dtype, 32).transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous too
    out = fn(q, k, v, **kw)
    out.backward(dout)

    ref_out, (rdq, rdk, rdv) = reference_run(q.detach(), k.detach(), v.detach(), dout, kw)
    tol = ATTN_TOL[dtype]
    assert out.shape == (b, hq, s, d)
    assert_rel(out.detach(), ref_out, tol, "out")
    assert_rel(q_bshd.grad, rdq.transpose(1, 2), tol, "dq")
    assert_rel(kv.grad[:, :, 0], rdk.transpose(1, 2), tol, "dk")
    assert_rel(kv.grad[:, :, 1], rdv.transpose(1, 2), tol, "dv")


# ----------------------------------------------------------------------------------------------------------
# norms
# ----------------------------------------------------------------------------------------------------------

from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

NORM_SHAPES = [(2, 5, 16), (37, 80), (1, 3, 37)]
RMS_KINDS = {"llama": (LlamaRMSNorm, 0.0), "gemma": (Gemma2RMSNorm, 1.0)}


def hf_rms_module(kind, hidden, dtype, seed):
    cls, _ = RMS_KINDS[kind]
    module = cls(hidden, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(randn((hidden,), torch.float64, seed, mult=0.5) + (1.0 if kind == "llama" else 0.0))
    return module.to(dtype)


def module_eps(module):
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


def hf_rstd64(x, eps):
    """1/rms as the HF modules compute it (float32 statistic; for float32/16-bit inputs), upcast to float64."""
    return torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", list(RMS_KINDS))
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_rms_norm_forward_bit_identical_to_hf(backend, kind, shape, dtype):
    module = hf_rms_module(kind, shape[-1], dtype, seed=1)
    x = randn(shape, dtype, 2, mult=3.0)
    with torch.no_grad():
        expected = module(x)
    got = ops.frozen_rms_norm(x, module.weight, module_eps(module), offset=RMS_KINDS[kind][1], backend=backend)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("weight_grad", [True, False], ids=["w_grad", "w_frozen"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", list(RMS_KINDS))
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_rms_norm_backward(backend, kind, shape, dtype, weight_grad):
    """dx = dy · w_eff / rms by hand in float64 (rms as the forward computes it); dw = plain autograd's dw."""
    offset = RMS_KINDS[kind][1]
    module = hf_rms_module(kind, shape[-1], dtype, seed=3)
    eps = module_eps(module)
    x = randn(shape, dtype, 4, mult=3.0).requires_grad_(True)
    dy = randn(shape, dtype, 5)
    weight = module.weight.detach().clone().requires_grad_(weight_grad)
    ops.frozen_rms_norm(x, weight, eps, offset=offset, backend=backend).backward(dy)

    # The HF modules compute the statistic in float32 whatever the input dtype; the frozen rms is that one.
    dx_ref = dy.double() * (offset + weight.detach().double()) * hf_rstd64(x.detach(), eps)
    assert x.grad.dtype == dtype
    assert_rel(x.grad, dx_ref, NORM_TOL[dtype], "dx")
    if weight_grad:
        x_plain = x.detach().clone()
        module(x_plain).backward(dy)  # plain autograd through the HF module
        assert weight.grad.dtype == module.weight.grad.dtype
        # float64: the HF modules normalise in float32 whatever the input dtype, so their own dw is only
        # float32-accurate; 1e-6 is what plain autograd itself can promise there.
        tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
        assert_rel(weight.grad, module.weight.grad, tol, "dw")
    else:
        assert weight.grad is None


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_rms_norm_float32_statistic_vs_float64(backend):
    """float32 inputs: dx also matches the float64 rms of the float64 formula to float32 accuracy."""
    x = randn((4, 80), torch.float32, 6, mult=3.0).requires_grad_(True)
    w = randn((80,), torch.float32, 7)
    dy = randn((4, 80), torch.float32, 8)
    ops.frozen_rms_norm(x, w, 1e-6, backend=backend).backward(dy)
    x64 = x.detach().double()
    dx_ref = dy.double() * w.double() / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_rel(x.grad, dx_ref, 1e-6, "dx")


@pytest.mark.parametrize(
    "offset", [0.0, 1.0], ids=str)
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_rms_norm_no_weight_backward_matches_forward(backend, offset):
    """weight=None: the forward is y = x / rms (no factor), so the frozen dx must be dy / rms."""
    x = randn((3, 16), torch.float32, 9, mult=2.0).requires_grad_(True)
    dy = randn((3, 16), torch.float32, 10)
    y = ops.frozen_rms_norm(x, None, 1e-6, offset=offset, backend=backend)
    rstd = hf_rstd64(x.detach(), 1e-6)
    assert_rel(y.detach(), x.detach().double() * rstd, 1e-6, "y")
    y.backward(dy)
    assert_rel(x.grad, dy.double() * rstd, 1e-6, "dx")


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_norm_one_dimensional_input(backend, norm):
    """x of shape [H] (a single vector) with a trainable weight."""
    x = randn((16,), torch.float64, 11).requires_grad_(True)
    w = randn((16,), torch.float64, 12).requires_grad_(True)
    dy = randn((16,), torch.float64, 13)
    if norm == "rms":
        ops.frozen_rms_norm(x, w, 1e-6, backend=backend).backward(dy)
        w_ref = w.detach().clone().requires_grad_(True)
        (w_ref * (x.detach() / torch.sqrt(x.detach().pow(2).mean() + 1e-6))).backward(dy)
    else:
        b = randn((16,), torch.float64, 14).requires_grad_(True)
        ops.frozen_layer_norm(x, w, b, 1e-5, backend=backend).backward(dy)
        w_ref = w.detach().clone().requires_grad_(True)
        F.layer_norm(x.detach(), (16,), w_ref, None, 1e-5).backward(dy)
        assert_rel(b.grad, dy, 1e-12, "db")
    assert_rel(w.grad, w_ref.grad, 1e-6, "dw")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_layer_norm(backend, shape, dtype, affine):
    hidden = shape[-1]
    module = torch.nn.LayerNorm(hidden, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            module.weight.copy_(randn((hidden,), torch.float64, 20, mult=0.5) + 1.0)
            module.bias.copy_(randn((hidden,), torch.float64, 21, mult=0.5))
    module = module.to(dtype)
    x = (randn(shape, dtype, 22, mult=3.0).double() + 1.5).to(dtype).requires_grad_(True)  # nonzero mean
    dy = randn(shape, dtype, 23)
    weight = module.weight.detach().clone().requires_grad_(True) if affine else None
    bias = module.bias.detach().clone().requires_grad_(True) if affine else None

    y = ops.frozen_layer_norm(x, weight, bias, module.eps, backend=backend)
    with torch.no_grad():
        expected = module(x)
    assert y.dtype == dtype
    assert torch.equal(y.detach(), expected)  # forward bit-identical to nn.LayerNorm
    y.backward(dy)

    x64 = x.detach().double()
    sigma = torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + module.eps)
    g = dy.double() * (weight.detach().double() if affine else 1.0)
    dx_ref = (g - g.mean(-1, keepdim=True)) / sigma
    assert x.grad.dtype == dtype
    assert_rel(x.grad, dx_ref, NORM_TOL[dtype], "dx")

    if affine:
        module(x.detach().clone()).backward(dy)  # plain autograd
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
        assert_rel(weight.grad, module.weight.grad, tol, "dw")
        assert_rel(bias.grad, module.bias.grad, tol, "db")


def test_layer_norm_mean_still_carries_gradient():
    """The frozen LayerNorm is not 'x/σ': a constant dy·w gives dx = 0 (the mean's gradient cancels it)."""
    x = randn((3, 16), torch.float64, 24).requires_grad_(True)
    for backend in ["eager", "torch"]:
        x.grad = None
        ops.frozen_layer_norm(x, None, None, 1e-5, backend=backend).backward(torch.ones(3, 16, dtype=torch.float64))
        assert x.grad.abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------

def _qkv(b=1, hq=4, hkv=2, s=5, d=16, dtype=torch.float32):
    return torch.randn(b, hq, s, d, dtype=dtype), torch.randn(b, hkv, s, d, dtype=dtype), \
        torch.randn(b, hkv, s, d, dtype=dtype)


def _attn_call(**overrides):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return ops.gim_attention(q, k, v, **args)


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(q=torch.randn(4, 5, 16)), ValueError, "4-D"),
    (dict(k=torch.randn(1, 2, 5, 16, 1)), ValueError, "4-D"),
    (dict(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16)), ValueError, "multiple of key/value heads"),
    (dict(k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8)), ValueError, "head dim"),
    (dict(v=torch.randn(1, 2, 6, 16)), ValueError, "same shape"),
    (dict(q=torch.randn(1, 4, 5, 16, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(q=torch.ones(1, 4, 5, 16, dtype=torch.long)), TypeError, "floating-point"),
    (dict(q="not a tensor"), TypeError, "torch.Tensor"),
    (dict(temperature=0.0), ValueError, "> 0"),
    (dict(temperature=-2.0), ValueError, "> 0"),
    (dict(temperature=float("nan")), ValueError, "> 0"),
    (dict(temperature="2"), TypeError, "number"),
    (dict(q_scale=-0.25), ValueError, "q_scale"),
    (dict(k_scale=-1.0), ValueError, "k_scale"),
    (dict(v_scale=float("inf")), ValueError, "v_scale"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(key_padding_mask=torch.ones(1, 5)), TypeError, "bool"),
    (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.long)), TypeError, "bool"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(sliding_window=0), ValueError, "sliding_window"),
    (dict(sliding_window=-3), ValueError, "sliding_window"),
    (dict(sliding_window=2.5), ValueError, "sliding_window"),
    (dict(sliding_window=4, causal=False), ValueError, "causal"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
], ids=lambda x: None)
def test_attention_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _attn_call(**overrides)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.frozen_rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6), ValueError, "weight must be"),
    (lambda: ops.frozen_rms_norm(torch.ones(3, 8, dtype=torch.long), None, 1e-6), TypeError, "floating-point"),
    (lambda: ops.frozen_rms_norm(torch.randn(3, 8), torch.randn(8), -1.0), ValueError, "eps"),
    (lambda: ops.frozen_rms_norm(torch.randn(3, 8), torch.randn(8), 1e-6, backend="fast"), ValueError,
     "backend must be one of"),
    (lambda: ops.frozen_layer_norm(torch.randn(3, 8), torch.randn(8), torch.randn(9), 1e-5), ValueError,
     "bias must be"),
    (lambda: ops.frozen_layer_norm(torch.randn(3, 8), torch.randn(2, 8), None, 1e-5), ValueError, "weight must be"),
    (lambda: ops.frozen_layer_norm(torch.randn(3, 8), None, None, 1e-5, backend="Torch"), ValueError,
     "backend must be one of"),
], ids=lambda x: None)
def test_norm_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
