"""Tests of the fused Triton GIM attention (``gim_fast.kernels.attention`` via ``gim_fast.ops.attention_triton``).

Without CUDA the kernels run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton); with CUDA they run for real on the GPU. The ground truth is the materialised float64
eager backend ``gim_attention_eager``, fed the same (rounded) inputs. Errors are max|Δ| / max|ref|.

The interpreter is slow (each program is Python), so the CPU grid is a covering subset of the odd shapes: seq
1, 37, 130 (not multiples of any block), head dims 64, 80, 256, GQA 1:1, 2:1, 4:1, 7:1, each feature on in some case.
The interpreter runs small fixed blocks, so these shapes already meet every kind of tile of the kernels' two-stage
loops — inside the causal/window band (unmasked stage), on its edge (masked stage) and outside it (skipped) — for
the forward/dQ tiling and the dK/dV tiling alike (``test_cases_cover_every_kind_of_tile`` checks that).
"""
import os
import sys

import torch

# Triton decides when it is imported (its own tl functions are jitted then) whether kernels are interpreted, so
# the variable only helps if triton is not imported yet. In a full pytest session another module may have
# imported it first: tests/conftest.py should then set the variable too (or run with TRITON_INTERPRET=1).
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported: kernels become interpreted

import inspect  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

from gim_fast.kernels.attention import attention_backward, attention_forward  # noqa: E402
from gim_fast.ops.attention_chunked import gim_attention_chunked  # noqa: E402
from gim_fast.ops.attention_eager import gim_attention_eager  # noqa: E402
from gim_fast.ops.attention_triton import gim_attention_triton  # noqa: E402

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and (_LATE or not INTERPRET),
    reason="no CUDA, and TRITON_INTERPRET was not 1 when triton was first imported: the kernels cannot run "
           "(set it in the environment or in tests/conftest.py)")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (real kernels, realistic sizes)")

# max|Δ| / max|ref| allowed, by input dtype.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GIM_DEFAULTS = dict(temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
OFF = dict(temperature=None, q_scale=None, k_scale=None, v_scale=None)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def make_inputs(b, hq, hkv, s, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
                   for shape in ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, hq, s, d)))
    return q, k, v, do


def padding_mask(b, s, left=(), right=(), device=DEVICE):
    """bool [b, s]: row r has ``left[r]`` padded tokens at the start and ``right[r]`` at the end."""
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    for r, n in enumerate(left):
        mask[r, :n] = False
    for r, n in enumerate(right):
        if n:
            mask[r, s - n:] = False
    return mask


def attn_args(d, **kw):
    args = dict(scale=1.0 / math.sqrt(d), causal=True, sliding_window=None, softcap=None,
                key_padding_mask=None, **GIM_DEFAULTS)
    args.update(kw)
    return args


def run(fn, q, k, v, do, args):
    """Output and (dq, dk, dv) of ``fn`` at upstream gradient ``do``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **args)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), grads


def reference(q, k, v, do, args):
    """The float64 eager backend on the same inputs (upcast after rounding)."""
    return run(gim_attention_eager, *(x.double() for x in (q, k, v, do)), args)


def rel_err(actual, expected, floor=0.0):
    """max|actual − expected| / max(max|expected|, floor)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    ref = max(expected.double().abs().max().item(), floor)
    return 0.0 if diff == 0.0 else (math.inf if ref == 0.0 else diff / ref)


# Largest error seen per dtype and quantity, printed at the end of the session with ``-s`` (for the report).
MAX_ERR: dict = {}


def check_against_reference(q, k, v, do, args, tol):
    out, grads = run(gim_attention_triton, q, k, v, do, args)
    ref_out, ref_grads = reference(q, k, v, do, args)
    assert out.dtype == q.dtype and out.shape == q.shape
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    # Gradients that are exactly 0 in the reference (seq 1: dS = P_T(dP − Δ_T) = 0) come out at rounding level;
    # measure them against 1e-2, the scale of a gradient of these N(0,1) inputs.
    errs = {"out": rel_err(out, ref_out)}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        if r.abs().max() > 0:
            errs[name] = rel_err(g, r)
        else:   # an exactly-zero reference (seq 1, window 1: dS = 0): absolute error / 1e-2 (a gradient's scale)
            errs[name + "(ref=0)"] = rel_err(g, r, floor=1e-2)
    for name, e in errs.items():
        key = (str(q.dtype), name)
        MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), e)
    if os.environ.get("GIM_PRINT_ERRORS"):
        print(f"\n{q.dtype} {tuple(q.shape)}/{k.shape[1]}:", {n: f"{e:.1e}" for n, e in errs.items()})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol:.0e}: {bad}"
    return out, grads


@pytest.fixture(scope="module", autouse=True)
def _print_max_errors():
    yield
    if MAX_ERR:
        print("\nmax errors (max|Δ|/max|ref|):", {f"{d}/{n}": f"{e:.1e}" for (d, n), e in sorted(MAX_ERR.items())})


# ----------------------------------------------------------------------------------------------------------
# float32 against the float64 reference: a covering grid of odd shapes and features
# ----------------------------------------------------------------------------------------------------------

# (id, (B, Hq, Hkv, S, D), attention args without scale)
FP32_CASES = [
    ("mha-s37-d64", (1, 2, 2, 37, 64), {}),
    ("gqa4-s130-d64", (2, 4, 1, 130, 64), {}),
    ("gqa7-s37-d80-T3-softcap", (1, 7, 1, 37, 80), dict(temperature=3.0, softcap=2.0)),
    ("gqa2-s130-d80-window-off", (1, 2, 1, 130, 80), dict(sliding_window=24, **OFF)),
    ("s1-d256", (1, 2, 2, 1, 256), {}),
    ("s37-d256-noncausal-T0.5", (1, 2, 1, 37, 256), dict(causal=False, temperature=0.5)),
    ("window1-T2", (1, 2, 1, 37, 64), dict(sliding_window=1)),
    ("padding-softcap", (2, 2, 1, 130, 64), dict(softcap=3.0, pad=((40, 0), (0, 17)))),
    ("padding-window-gqa2", (2, 4, 2, 37, 64), dict(sliding_window=9, softcap=2.5, pad=((5, 3), (0, 36)))),
    ("padding-noncausal-off", (2, 2, 2, 37, 80), dict(causal=False, pad=((0, 30), (10, 0)), **OFF)),
    ("gqa4-s37-d96-padding-T3", (2, 4, 1, 37, 96), dict(temperature=3.0, pad=((12, 37), (0, 0)))),
    ("mha-s130-d128-window", (1, 2, 2, 130, 128), dict(sliding_window=70)),
    ("scales-only", (1, 4, 2, 37, 64), dict(temperature=None)),
    ("temperature-only", (1, 4, 2, 37, 64), dict(q_scale=None, k_scale=None, v_scale=None)),
]


@pytest.mark.parametrize("shape,opts", [c[1:] for c in FP32_CASES], ids=[c[0] for c in FP32_CASES])
def test_fp32_matches_eager_reference(shape, opts):
    _check_fp32_case(shape, opts)


def _check_fp32_case(shape, opts):
    """One FP32_CASES entry (``pad``: (left, right) padding per batch row) against the eager reference."""
    b, hq, hkv, s, d = shape
    opts = dict(opts)
    pad = opts.pop("pad", None)
    if pad is not None:
        opts["key_padding_mask"] = padding_mask(b, s, left=pad[0], right=pad[1])
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.float32)
    check_against_reference(q, k, v, do, attn_args(d, **opts), TOL[torch.float32])


def _allowed_dense(s, causal, window, real):
    """bool [s, s]: query i may attend key j (the definition, materialised)."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    ok = torch.ones(s, s, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j > i - window
    if real is not None:
        ok &= real.cpu()[None, :]
    return ok


def _tile_kinds(ok, rows, cols, row_starts, col_starts):
    """Kinds of the tiles [r, r + rows) × [c, c + cols) of ``ok``: "inside" (every pair allowed, the tile inside
    the sequence), "outside" (no pair allowed), "edge" (the rest)."""
    s = ok.shape[0]
    kinds = set()
    for r in row_starts:
        for c in col_starts:
            tile = ok[r:r + rows, c:c + cols]
            inside = r + rows <= s and c + cols <= s and bool(tile.all())
            kinds.add("inside" if inside else ("edge" if tile.any() else "outside"))
    return kinds


def test_cases_cover_every_kind_of_tile():
    """For each feature (causal, sliding window, key padding), the float32 and 16-bit cases together meet tiles of
    every kind with the interpreter's blocks: forward/dQ tiles (BLOCK_M queries × BLOCK_N keys) and dK/dV tiles
    (BLOCK_N keys × BLOCK_M // G positions of the G stacked heads, from the key block's first position when
    causal). Computed from the dense mask, independently of the kernels."""
    from gim_fast.kernels.attention import _INTERPRET_CONFIGS as blocks

    fm, fn = blocks["fwd"]["BLOCK_M"], blocks["fwd"]["BLOCK_N"]
    kn = blocks["dkdv"]["BLOCK_N"]
    seen = {}
    for _, (b, hq, hkv, s, _), opts in FP32_CASES + LOW_CASES:
        pad = opts.get("pad")
        mask = padding_mask(b, s, left=pad[0], right=pad[1]) if pad else None
        causal, window = opts.get("causal", True), opts.get("sliding_window")
        pos = blocks["dkdv"]["BLOCK_M"] // min(hq // hkv, blocks["dkdv"]["BLOCK_M"])
        for r in range(b):
            ok = _allowed_dense(s, causal, window, None if mask is None else mask[r])
            row_major = _tile_kinds(ok, fm, fn, range(0, s, fm), range(0, s, fn))
            key_major = set()
            for n0 in range(0, s, kn):
                key_major |= _tile_kinds(ok, pos, kn, range(n0 if causal else 0, s, pos), [n0])
            for feature, on in (("causal", causal), ("window", window is not None), ("padding", pad is not None)):
                if on:
                    seen.setdefault(feature, {"fwd/dq": set(), "dkdv": set()})
                    seen[feature]["fwd/dq"] |= row_major
                    seen[feature]["dkdv"] |= key_major
    for feature, by_tiling in seen.items():
        for tiling, kinds in by_tiling.items():
            assert kinds == {"inside", "edge", "outside"}, (feature, tiling, kinds)
    assert set(seen) == {"causal", "window", "padding"}


# ----------------------------------------------------------------------------------------------------------
# 16-bit inputs (fp32 accumulation inside)
# ----------------------------------------------------------------------------------------------------------

LOW_CASES = [
    ("gqa4-s130-d64-padding", (2, 4, 1, 130, 64), dict(pad=((20, 0), (0, 9)))),
    ("gqa7-s37-d80-window-softcap", (1, 7, 1, 37, 80), dict(sliding_window=12, softcap=2.0, temperature=1.5)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,opts", [c[1:] for c in LOW_CASES], ids=[c[0] for c in LOW_CASES])
def test_low_precision_matches_eager_reference(shape, opts, dtype):
    b, hq, hkv, s, d = shape
    opts = dict(opts)
    pad = opts.pop("pad", None)
    if pad is not None:
        opts["key_padding_mask"] = padding_mask(b, s, left=pad[0], right=pad[1])
    q, k, v, do = make_inputs(b, hq, hkv, s, d, dtype, seed=1)
    check_against_reference(q, k, v, do, attn_args(d, **opts), TOL[dtype])


# ----------------------------------------------------------------------------------------------------------
# semantics
# ----------------------------------------------------------------------------------------------------------

def test_rows_without_keys_output_zero_and_pass_no_gradient():
    """Left padding: a query row whose keys are all padding outputs exactly 0, gets LSE = +inf and passes no
    gradient; a sequence that is padding throughout gives zeros everywhere."""
    b, hq, hkv, s, d = 2, 2, 1, 37, 64
    mask = padding_mask(b, s, left=(6, s))
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.float32, seed=2)
    args = attn_args(d, key_padding_mask=mask, softcap=4.0)
    out, (dq, dk, dv) = check_against_reference(q, k, v, do, args, TOL[torch.float32])
    assert (out[0, :, :6] == 0).all() and (out[1] == 0).all()
    assert (dq[0, :, :6] == 0).all() and (dq[1] == 0).all()
    # Padded keys receive no gradient either.
    assert (dk[0, :, :6] == 0).all() and (dv[0, :, :6] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    _, lse, lse_t, _ = attention_forward(q, k, v, scale=args["scale"], causal=True, softcap=4.0,
                                         key_padding_mask=mask, temperature=2.0, need_backward=True)
    assert torch.isinf(lse[0, :, :6]).all() and torch.isinf(lse_t[1]).all()
    assert torch.isfinite(lse[0, :, 6:]).all()


def test_forward_statistics():
    """LSE, LSE_T and O_T = P_T V equal their definitions; without a backward they are not computed."""
    b, hq, hkv, s, d = 1, 4, 2, 37, 80
    q, k, v, _ = make_inputs(b, hq, hkv, s, d, torch.float32, seed=3)
    scale, t = 1.0 / math.sqrt(d), 3.0
    out, lse, lse_t, o_t = attention_forward(q, k, v, scale=scale, causal=True, sliding_window=10,
                                             temperature=t, need_backward=True)
    kr, vr = (x.double().repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    scores = (q.double() @ kr.transpose(-1, -2)) * scale
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - 10)).to(scores.device), float("-inf"))
    assert rel_err(out, torch.softmax(scores, -1) @ vr) < 1e-5
    assert rel_err(lse, torch.logsumexp(scores, -1)) < 1e-6
    assert rel_err(lse_t, torch.logsumexp(scores / t, -1)) < 1e-6
    assert rel_err(o_t, torch.softmax(scores / t, -1) @ vr) < 1e-5
    out2, lse2, none_t, none_o = attention_forward(q, k, v, scale=scale, causal=True, sliding_window=10,
                                                   temperature=t, need_backward=False)
    assert none_t is None and none_o is None
    assert rel_err(out2, out) < 1e-6 and torch.equal(lse2.isinf(), lse.isinf())


def test_temperature_one_is_off():
    q, k, v, do = make_inputs(1, 2, 1, 37, 64, torch.float32, seed=4)
    a, ga = run(gim_attention_triton, q, k, v, do, attn_args(64, temperature=1.0))
    b, gb = run(gim_attention_triton, q, k, v, do, attn_args(64, temperature=None))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_deterministic():
    """Two runs give bit-identical gradients (no atomics: dK/dV of a GQA group are reduced by one program)."""
    q, k, v, do = make_inputs(1, 7, 1, 130, 64, torch.float32, seed=5)
    args = attn_args(64, sliding_window=50, softcap=3.0)
    out1, g1 = run(gim_attention_triton, q, k, v, do, args)
    out2, g2 = run(gim_attention_triton, q, k, v, do, args)
    assert torch.equal(out1, out2)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


def test_non_contiguous_inputs():
    """q/k/v as transformers passes them (transposed views of [B,S,H,D]), and a non-contiguous grad_out:
    the same bits as contiguous inputs, and correct."""
    b, hq, hkv, s, d = 2, 4, 2, 37, 80
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.float32, seed=6)
    qt, kt, vt, dot = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    assert not any(x.is_contiguous() for x in (qt, kt, vt, dot))
    args = attn_args(d, key_padding_mask=padding_mask(b, s, left=(3, 0), right=(0, 5)), softcap=3.0)
    out, grads = check_against_reference(qt, kt, vt, dot, args, TOL[torch.float32])
    out_c, grads_c = run(gim_attention_triton, q, k, v, do, args)
    assert torch.equal(out, out_c)
    for x, y in zip(grads, grads_c):
        assert torch.equal(x, y)


def test_grad_out_in_another_layout_than_q():
    """dO laid out unlike q (contiguous against a transposed q), and q a slice of a fused projection (not dense):
    the launcher brings dO into q's layout (or both to contiguous) before the kernels; the same bits either way."""
    b, hq, hkv, s, d = 1, 4, 2, 37, 64
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.float32, seed=13)
    args = attn_args(d, softcap=3.0)
    _, ref = run(gim_attention_triton, q, k, v, do, args)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)                      # [B,S,H,D] memory, dO contiguous
    fused = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :d]               # a slice: strides with a gap
    for q_in in (qt, fused):
        _, grads = run(gim_attention_triton, q_in, k, v, do, args)
        for x, y in zip(grads, ref):
            assert torch.equal(x, y)


def _lazy_rescale_decisions(q, k, scale):
    """What the forward's lazy rescale decides on the unmasked tiles after a row block's first, replayed in float64
    from the definition with the interpreter's blocks (causal, T off, one KV head): {"taken", "skipped"} ⊇."""
    from gim_fast.kernels.attention import _INTERPRET_CONFIGS as blocks

    bm, bn = blocks["fwd"]["BLOCK_M"], blocks["fwd"]["BLOCK_N"]
    w = (q[0].double() @ k[0, 0].double().T) * scale * math.log2(math.e)      # [H, S, S] in log2 units
    seen = set()
    for start_m in range(0, w.shape[1], bm):
        m = torch.full(w[:, start_m:start_m + bm].shape[:2], -math.inf, dtype=torch.float64)
        for n in range(0, start_m + 1 - bn + 1, bn):                         # tiles with n + bn <= start_m + 1
            new = torch.maximum(m, w[:, start_m:start_m + bm, n:n + bn].amax(-1))
            if n > 0:
                seen.add("taken" if (new - m).max() > 8 else "skipped")
            if n == 0 or (new - m).max() > 8:
                m = new
    return seen


def test_lazy_rescale_with_growing_scores():
    """Scores that grow along the keys, so the forward's lazy rescale (unmasked stage: the accumulators move to a
    new reference only when a row's max grew by more than 2^8 in P) is taken on some tiles and skipped on others
    (exponentials up to 2^8 against a stale reference): out, LSE, LSE_T, O_T and the gradients against float64,
    in float32 and, for the overflow bound (P ≤ 2^8, u ≤ 2^4 at T = 2), in float16."""
    b, hq, hkv, s, d = 1, 2, 1, 130, 64
    g = torch.Generator().manual_seed(14)
    q = torch.randn(b, hq, s, d, generator=g) * 0.3
    k = torch.randn(b, hkv, s, d, generator=g) * 0.3
    v, do = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hq, s, d, generator=g)
    q[..., 0] = 4.0
    # Key j's score with any query grows by 0.25·j·(4 / sqrt(d))·... ≈ 0.125 per key: ~2 nats per 16-key tile,
    # so the running max outgrows 2^8 (5.5 nats) every few tiles and stays within it in between.
    k[..., 0] = 0.25 * torch.arange(s, dtype=torch.float32)
    assert _lazy_rescale_decisions(q, k, 1.0 / math.sqrt(d)) >= {"taken", "skipped"}
    for dtype in (torch.float32, torch.float16):
        qq, kk, vv, dd = (x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, do))
        for opts in (dict(), dict(temperature=1.5), dict(**OFF)):
            check_against_reference(qq, kk, vv, dd, attn_args(d, **opts), TOL[dtype])
    scale, t = 1.0 / math.sqrt(d), 2.0
    qq, kk, vv = (x.to(DEVICE) for x in (q, k, v))
    out, lse, lse_t, o_t = attention_forward(qq, kk, vv, scale=scale, causal=True, temperature=t,
                                             need_backward=True)
    scores = (qq.double() @ kk.double().transpose(-1, -2)) * scale
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    scores = scores.masked_fill(~(j <= i).to(scores.device), float("-inf"))
    assert rel_err(lse, torch.logsumexp(scores, -1)) < 1e-6
    assert rel_err(lse_t, torch.logsumexp(scores / t, -1)) < 1e-6
    assert rel_err(o_t, torch.softmax(scores / t, -1) @ vv.double()) < 1e-5


def test_dkdv_keys_major_tiling():
    """The dK/dV kernel's other tiling (Sᵀ = K Qᵀ, P and dS kept in registers; the interpreter's default is
    S = Q Kᵀ with dVᵀ/dKᵀ accumulators) against float64 on cases that cross every kind of tile (GQA 4 and 7,
    window, soft-cap, padding, T = 3 / 2 / off)."""
    from gim_fast.kernels import attention as kernels

    cases = [FP32_CASES[1], FP32_CASES[2], FP32_CASES[8], FP32_CASES[10]]
    saved = kernels._INTERPRET_CONFIGS["dkdv"]
    assert saved["ROWS_MAJOR"]            # the default tiling runs in every other test of this file
    try:
        kernels._INTERPRET_CONFIGS["dkdv"] = dict(saved, ROWS_MAJOR=False)
        for _, shape, opts in cases:
            _check_fp32_case(shape, opts)
    finally:
        kernels._INTERPRET_CONFIGS["dkdv"] = saved


def test_padding_with_holes_and_in_the_middle():
    """Key padding that is not a prefix or suffix: real tokens only in the middle of one row, holes in the other
    (so no key span is known to be all real and every tile takes the masked stage)."""
    b, hq, hkv, s, d = 2, 2, 1, 70, 64
    mask = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    mask[0, :20] = False
    mask[0, 50:] = False
    mask[1, 17:19] = False
    mask[1, 40:60:3] = False
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.float32, seed=10)
    check_against_reference(q, k, v, do, attn_args(d, key_padding_mask=mask, sliding_window=50),
                            TOL[torch.float32])


@pytest.mark.parametrize("shape,opts", [
    ((2, 4, 2, 37, 64), dict(sliding_window=20, pad=((5, 0), (0, 4)))),
    ((1, 7, 1, 20, 80), dict(softcap=3.0, **OFF)),
], ids=["gqa2-window-padding-T2", "gqa7-d80-softcap-off"])
def test_stacked_cotangents_match_separate_calls(shape, opts):
    """``attention_backward`` with dO ``[M,B,Hq,S,D]``: entry m equals the backward of cotangent m alone, against
    the same forward statistics (bit for bit under the interpreter: the same programs run)."""
    b, hq, hkv, s, d = shape
    n_cot = 2
    opts = dict(opts)
    pad = opts.pop("pad", None)
    args = attn_args(d, key_padding_mask=padding_mask(b, s, left=pad[0], right=pad[1]) if pad else None, **opts)
    scales = {name: args.pop(name) for name in ("q_scale", "k_scale", "v_scale")}
    q, k, v, _ = make_inputs(b, hq, hkv, s, d, torch.float32, seed=11)
    dos = torch.randn(n_cot, b, hq, s, d, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    saved = attention_forward(q, k, v, need_backward=True, **args)
    dq, dk, dv = attention_backward(dos, q, k, v, *saved, **args, **scales)
    assert dq.shape == (n_cot, b, hq, s, d) and dk.shape == dv.shape == (n_cot, b, hkv, s, d)
    for m in range(n_cot):
        single = attention_backward(dos[m], q, k, v, *saved, **args, **scales)
        for name, stacked, one in zip(("dq", "dk", "dv"), (dq[m], dk[m], dv[m]), single):
            if INTERPRET:
                assert torch.equal(stacked, one), name
            else:
                assert rel_err(stacked, one) < 1e-6, name
    with pytest.raises(ValueError, match=r"\[M,B,Hq,S,D\]"):
        attention_backward(dos[:, :, :1], q, k, v, *saved, **args, **scales)


def test_signature_matches_torch_backend():
    def keywords(fn):   # each backend's own option left out: the torch backend's chunk size, the fallback switch
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()
                if p.name not in ("chunk_size", "fallback")]
    assert keywords(gim_attention_triton) == keywords(gim_attention_chunked)


def test_backward_needs_temperature_statistics():
    q, k, v, do = make_inputs(1, 2, 1, 8, 64, torch.float32)
    out, lse, _, _ = attention_forward(q, k, v, scale=0.125, causal=True, temperature=2.0, need_backward=False)
    with pytest.raises(ValueError, match="need_backward"):
        attention_backward(do, q, k, v, out, lse, scale=0.125, causal=True, temperature=2.0)


# ----------------------------------------------------------------------------------------------------------
# GPU only: realistic sizes, against the torch (row-chunked) backend
# ----------------------------------------------------------------------------------------------------------

def _vs_torch_backend(shape, dtype, **opts):
    b, hq, hkv, s, d = shape
    q, k, v, do = make_inputs(b, hq, hkv, s, d, dtype, seed=7)
    args = attn_args(d, **opts)
    out, grads = run(gim_attention_triton, q, k, v, do, args)
    ref_out, ref_grads = run(gim_attention_chunked, q, k, v, do, args)
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert rel_err(x, r, floor=1e-2) <= TOL[dtype], name
    return grads


@cuda_only
def test_gpu_bf16_long_gqa4():
    _vs_torch_backend((1, 32, 8, 4096, 128), torch.bfloat16)


@cuda_only
def test_gpu_bf16_window_softcap_padding_d256():
    mask = padding_mask(2, 2048, left=(100, 0), right=(0, 300))
    _vs_torch_backend((2, 8, 4, 2048, 256), torch.bfloat16, sliding_window=512, softcap=50.0,
                      key_padding_mask=mask, temperature=1.7)


@cuda_only
def test_gpu_fp16_d80_odd_length():
    _vs_torch_backend((1, 14, 2, 3001, 80), torch.float16)


@cuda_only
def test_gpu_bf16_deterministic():
    q, k, v, do = make_inputs(1, 32, 8, 4096, 128, torch.bfloat16, seed=8)
    args = attn_args(128)
    _, g1 = run(gim_attention_triton, q, k, v, do, args)
    _, g2 = run(gim_attention_triton, q, k, v, do, args)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)
