"""Tests of the frozen-norm Triton kernels (``gim_fast.kernels.norm`` through ``gim_fast.ops.norm_triton``).

Runs on CUDA when there is one, else on CPU under the Triton interpreter. The references are independent of
the code under test:

* forward: the Hugging Face modules (``LlamaRMSNorm``, ``Gemma2RMSNorm`` with random weights) and
  ``torch.nn.LayerNorm``. In float32 the kernel's row sum runs in a different order from torch's, so r (σ⁻¹)
  may differ by an ulp or two; the test bounds that in ulps, and checks bit-identity where the statistic is
  shared (``exact_rstd=True``).
* dx: the frozen-statistic formulas written out by hand in float64;
* dw / db: plain float64 autograd of the module (freezing a statistic of x does not change them).

Tolerances are max|actual − reference| / max|reference|.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU runs)

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from gim_fast.kernels import norm as kernels  # noqa: E402
from gim_fast.kernels.norm import _round_to  # noqa: E402
from gim_fast.ops.norm_triton import frozen_layer_norm_triton, frozen_rms_norm_triton  # noqa: E402
from gim_fast.ops.norms import FrozenLayerNorm, FrozenRMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels._interpreting():
    # e.g. an earlier test module imported a transformers model (which imports triton) before this file set
    # the variable: set TRITON_INTERPRET=1 in conftest.py to run these tests in a whole-suite session
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set: the kernels cannot run",
                allow_module_level=True)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(rows, hidden) for rows in (1, 7, 37) for hidden in (48, 80, 576, 1000)]  # masked blocks
EPS = 1e-6
# RMSNorm forward vs the HF module, in ulps of the output dtype. On CPU the kernel's r may differ from torch's by
# up to 2 ulp (another summation order); x·r and the weight multiply can each add about one.
MAX_ULP = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 4}


def rel_err(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    diff = (actual.double() - expected.double()).abs().max().item()
    ref = expected.double().abs().max().item()
    return diff / ref if ref else diff


def ulp_diff(a, b):
    """max distance in units in the last place between two float32/float16/bfloat16 tensors."""
    int_type, magnitude = (torch.int32, 0x7FFFFFFF) if a.dtype == torch.float32 else (torch.int16, 0x7FFF)

    def ordered(t):  # the bit pattern as an integer that grows with the value
        i = t.detach().contiguous().view(int_type).long()
        return torch.where(i < 0, -(i & magnitude), i)
    return (ordered(a) - ordered(b)).abs().max().item()


def make_rms(flavor, hidden, dtype, gen):
    if flavor == "llama":
        module, offset = LlamaRMSNorm(hidden, eps=EPS), 0.0
        w = 1.0 + 0.5 * torch.randn(hidden, generator=gen)
    else:
        module, offset = Gemma2RMSNorm(hidden, eps=EPS), 1.0
        w = 0.5 * torch.randn(hidden, generator=gen)
    with torch.no_grad():
        module.weight.copy_(w)
    return module.to(DEVICE, dtype), offset


def rand(shape, dtype, gen, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavor", ["llama", "gemma"])
def test_rms_norm_matches_hf_and_float64_reference(flavor, dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    module, offset = make_rms(flavor, hidden, dtype, gen)
    x = rand((rows, hidden), dtype, gen, scale=3.0).requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    dy = rand((rows, hidden), dtype, gen)

    y = frozen_rms_norm_triton(x, weight, EPS, offset)
    with torch.no_grad():
        y_hf = module(x)
    assert y.dtype == y_hf.dtype and y.shape == y_hf.shape
    assert ulp_diff(y, y_hf) <= MAX_ULP[dtype]
    assert rel_err(y, y_hf) <= TOL[dtype]
    # with torch's own r the forward is bit-identical, whatever the dtype
    y_exact = frozen_rms_norm_triton(x, weight, EPS, offset, exact_rstd=True)
    assert torch.equal(y_exact, y_hf)

    y.backward(dy)
    # dx by hand in float64: dy · (offset + w) · r, r from x in float64
    x64, w64, dy64 = x.detach().double(), weight.detach().double(), dy.double()
    r64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    assert rel_err(x.grad, dy64 * (offset + w64) * r64) <= TOL[dtype]
    # dw from plain float64 autograd of the module
    m64 = copy.deepcopy(module).double()
    m64(x64).backward(dy64)
    assert weight.grad.dtype == weight.dtype
    assert rel_err(weight.grad, m64.weight.grad) <= TOL[dtype]


@pytest.mark.parametrize("flavor", ["llama", "gemma"])
def test_rms_norm_float64(flavor):
    """float64 follows the HF modules: r and the normalisation in float32, the Llama product in float64."""
    gen = torch.Generator().manual_seed(5)
    module, offset = make_rms(flavor, 80, torch.float64, gen)
    x = rand((7, 80), torch.float64, gen).requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    y = frozen_rms_norm_triton(x, weight, EPS, offset)
    with torch.no_grad():
        y_hf = module(x)
    assert y.dtype == torch.float64 and rel_err(y, y_hf) <= 1e-6
    assert torch.equal(frozen_rms_norm_triton(x, weight, EPS, offset, exact_rstd=True), y_hf)
    dy = rand((7, 80), torch.float64, gen)
    y.backward(dy)
    x64 = x.detach()
    r64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    assert x.grad.dtype == torch.float64 and rel_err(x.grad, dy * (offset + weight.detach()) * r64) <= 1e-6
    module(x64).backward(dy)
    assert rel_err(weight.grad, module.weight.grad) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_agrees_with_torch_backend(dtype):
    """Sharing r, the Triton and torch backends give the same forward and dx bit for bit."""
    gen = torch.Generator().manual_seed(11)
    for flavor in ("llama", "gemma"):
        module, offset = make_rms(flavor, 576, dtype, gen)
        x = rand((3, 4, 576), dtype, gen).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = rand((3, 4, 576), dtype, gen)
        y = frozen_rms_norm_triton(x, module.weight.detach(), EPS, offset, exact_rstd=True)
        y_ref = FrozenRMSNorm.apply(x_ref, module.weight.detach(), EPS, offset)[0]
        assert torch.equal(y, y_ref)
        y.backward(dy)
        y_ref.backward(dy)
        assert torch.equal(x.grad, x_ref.grad)


def test_rms_norm_mixed_dtypes_and_partial_grads():
    """Llama with a float32 weight on bf16 activations: float32 output (HF's promotion); only the asked grads."""
    gen = torch.Generator().manual_seed(3)
    module, _ = make_rms("llama", 48, torch.float32, gen)
    x = rand((7, 48), torch.bfloat16, gen)
    w = module.weight.detach().clone().requires_grad_()
    y = frozen_rms_norm_triton(x, w, EPS, 0.0, exact_rstd=True)
    with torch.no_grad():
        y_hf = module(x)
    assert y.dtype == torch.float32 and torch.equal(y, y_hf)
    y.sum().backward()  # weight only: x does not require grad
    w_ref = module.weight.detach().clone().requires_grad_()
    FrozenRMSNorm.apply(x, w_ref, EPS, 0.0)[0].sum().backward()
    assert rel_err(w.grad, w_ref.grad) <= 1e-5
    xg = x.clone().requires_grad_()  # input only: the weight is frozen
    frozen_rms_norm_triton(xg, module.weight.detach(), EPS, 0.0).sum().backward()
    xg_ref = x.clone().requires_grad_()
    FrozenRMSNorm.apply(xg_ref, module.weight.detach(), EPS, 0.0)[0].sum().backward()
    assert xg.grad.dtype == torch.bfloat16 and torch.equal(xg.grad, xg_ref.grad)


def test_rms_norm_without_weight():
    gen = torch.Generator().manual_seed(4)
    x = rand((7, 80), torch.float32, gen).requires_grad_()
    y = frozen_rms_norm_triton(x, None, EPS, 0.0)
    x64 = x.detach().double()
    r64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    assert rel_err(y, x64 * r64) <= 1e-6
    dy = rand((7, 80), torch.float32, gen)
    y.backward(dy)
    assert rel_err(x.grad, dy.double() * r64) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# LayerNorm


def make_ln(hidden, dtype, gen, affine=True, bias=True):
    module = torch.nn.LayerNorm(hidden, eps=1e-5, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            module.weight.copy_(1.0 + 0.5 * torch.randn(hidden, generator=gen))
            if bias:
                module.bias.copy_(0.5 * torch.randn(hidden, generator=gen))
    return module.to(DEVICE, dtype)


def ln_dx_reference(x64, w64, dy64, eps):
    mean = x64.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x64 - mean).pow(2).mean(-1, keepdim=True) + eps)
    g = dy64 * w64 if w64 is not None else dy64
    return (g - g.mean(-1, keepdim=True)) * rstd


@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_layer_norm_matches_torch_and_float64_reference(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 1000 + hidden + 1)
    module = make_ln(hidden, dtype, gen)
    x = (rand((rows, hidden), dtype, gen, scale=2.0) + 0.7).requires_grad_()  # a non-zero mean
    w = module.weight.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    dy = rand((rows, hidden), dtype, gen)

    y = frozen_layer_norm_triton(x, w, b, module.eps)
    with torch.no_grad():
        y_ref = module(x)
    assert y.dtype == y_ref.dtype
    # not bit-identical: torch's CPU kernel computes (x·σ⁻¹ − μ·σ⁻¹)·w + b and sums in another order
    assert rel_err(y, y_ref) <= TOL[dtype]

    y.backward(dy)
    x64, dy64 = x.detach().double(), dy.double()
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, ln_dx_reference(x64, w.detach().double(), dy64, module.eps)) <= TOL[dtype]
    m64 = copy.deepcopy(module).double()
    m64(x64).backward(dy64)
    assert rel_err(w.grad, m64.weight.grad) <= TOL[dtype]
    assert rel_err(b.grad, m64.bias.grad) <= TOL[dtype]


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_layer_norm_without_weight_or_bias(affine, bias):
    gen = torch.Generator().manual_seed(8)
    module = make_ln(80, torch.float32, gen, affine=affine, bias=bias)
    x = rand((7, 80), torch.float32, gen).requires_grad_()
    w = module.weight.detach().clone().requires_grad_() if affine else None
    y = frozen_layer_norm_triton(x, w, None, module.eps)
    with torch.no_grad():
        assert rel_err(y, module(x)) <= 1e-5
    dy = rand((7, 80), torch.float32, gen)
    y.backward(dy)
    w64 = w.detach().double() if affine else None
    assert rel_err(x.grad, ln_dx_reference(x.detach().double(), w64, dy.double(), module.eps)) <= 1e-5
    if affine:
        m64 = copy.deepcopy(module).double()
        m64(x.detach().double()).backward(dy.double())
        assert rel_err(w.grad, m64.weight.grad) <= 1e-5


def test_layer_norm_agrees_with_torch_backend_in_backward():
    gen = torch.Generator().manual_seed(9)
    module = make_ln(576, torch.float32, gen)
    x = rand((2, 5, 576), torch.float32, gen).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = rand((2, 5, 576), torch.float32, gen)
    frozen_layer_norm_triton(x, module.weight.detach(), module.bias.detach(), module.eps).backward(dy)
    FrozenLayerNorm.apply(x_ref, module.weight.detach(), module.bias.detach(), module.eps)[0].backward(dy)
    assert rel_err(x.grad, x_ref.grad) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# layout, determinism, edge cases


def _run(fn, x, params, dy):
    x = x.detach().requires_grad_()
    params = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    y = fn(x, *params)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params if p is not None]


def _norms(gen, hidden):
    rms_module, _ = make_rms("llama", hidden, torch.float32, gen)
    gemma_module, _ = make_rms("gemma", hidden, torch.float32, gen)
    ln_module = make_ln(hidden, torch.float32, gen)
    return [
        (lambda x, w: frozen_rms_norm_triton(x, w, EPS, 0.0), [rms_module.weight]),
        (lambda x, w: frozen_rms_norm_triton(x, w, EPS, 1.0), [gemma_module.weight]),
        (lambda x, w, b: frozen_layer_norm_triton(x, w, b, 1e-5), [ln_module.weight, ln_module.bias]),
    ]


def test_non_contiguous_rows_and_leading_shapes():
    """Strided rows (a view with row stride > hidden), a transposed batch and a strided gradient give the
    same bits as contiguous copies."""
    gen = torch.Generator().manual_seed(12)
    hidden = 80
    wide = rand((3, 5, hidden + 13), torch.float32, gen)
    strided = wide[..., :hidden]  # rows 93 elements apart, reshape stays a view
    transposed = rand((5, 3, hidden), torch.float32, gen).transpose(0, 1)  # reshape must copy
    dy_wide = rand((3, 5, hidden + 7), torch.float32, gen)
    dy = dy_wide[..., :hidden]
    for fn, params in _norms(gen, hidden):
        for x in (strided, transposed):
            got = _run(fn, x, params, dy)
            want = _run(fn, x.contiguous(), params, dy.contiguous())
            assert got[0].shape == (3, 5, hidden)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


def test_deterministic():
    gen = torch.Generator().manual_seed(13)
    x = rand((37, 576), torch.float32, gen)
    dy = rand((37, 576), torch.float32, gen)
    for fn, params in _norms(gen, 576):
        first, second = _run(fn, x, params, dy), _run(fn, x, params, dy)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_empty_and_errors():
    gen = torch.Generator().manual_seed(14)
    for fn, params in _norms(gen, 48):
        x = torch.zeros((0, 48), device=DEVICE, requires_grad=True)
        y = fn(x, *params)
        assert y.shape == (0, 48)
        y.sum().backward()
        assert x.grad.shape == (0, 48)
    too_wide = torch.zeros((1, kernels.MAX_HIDDEN_SIZE + 1), device=DEVICE)
    with pytest.raises(ValueError, match="hidden size"):
        frozen_rms_norm_triton(too_wide, None, EPS)
    if DEVICE == "cpu":
        return
    with pytest.raises(ValueError, match="one device"):
        frozen_rms_norm_triton(torch.zeros(2, 8, device=DEVICE), torch.ones(8), EPS)


@triton.jit
def _bf16_round_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, _round_to(tl.load(X + offs, mask=mask), tl.bfloat16), mask=mask)


def test_bfloat16_rounding_matches_torch():
    """``_round_to`` rounds float32 to bfloat16 to nearest even like torch (the interpreter's own cast
    truncates): random bit patterns, exact ties, overflow to inf, subnormals, inf and NaN."""
    gen = torch.Generator().manual_seed(15)
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=gen, dtype=torch.int64)
    ties = (torch.randint(0, 2**15, (256,), generator=gen) << 16) | 0x8000  # exactly half-way
    special = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x00008000, 0x00018000, 0x7F800000,
                            0xFF800000, 0x7FC00000, 0x7F800001, 0x80000000, 0x3F808000, 0x3F818000])
    special = torch.where(special >= 2**31, special - 2**32, special)
    x = torch.cat([bits, ties, -ties, special]).to(torch.int32).view(torch.float32).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _bf16_round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))
