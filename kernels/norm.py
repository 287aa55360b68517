"""Frozen-norm Triton kernels: RMSNorm and LayerNorm whose backward treats the statistic as a constant.

One row per program in the forward (``BLOCK`` = the next power of two of the hidden size, masked); rows may
have any stride, elements within a row must be contiguous. The math (see ``gim_fast/ops/norms.py``, whose
``torch`` backend these kernels reproduce):

RMSNorm, r = 1 / sqrt(mean(x₃₂²) + eps), always in float32 (as the Hugging Face modules do, even for float64):
    offset = 0 (Llama, Qwen, Mistral):  y = w · (x₃₂ · r).to(x.dtype), the product in promote(w.dtype, x.dtype)
    offset ≠ 0 (Gemma, (1 + w)):        y = (x₃₂ · r · (offset + w₃₂)).to(x.dtype)
    no weight:                          y = (x₃₂ · r).to(x.dtype)
    frozen backward:                    dx = dy · (offset + w) · r;   dw = Σ_rows dy · n
                                        with n = (x₃₂ · r).to(x.dtype) for Llama, x₃₂ · r for Gemma
LayerNorm (float64 inputs in float64, everything else in float32):
    y = (x − μ) · σ⁻¹ · w + b,  σ⁻¹ = 1 / sqrt(mean((x − μ)²) + eps)
    frozen backward, g = dy · w:        dx = (g − mean(g)) · σ⁻¹
                                        dw = Σ_rows dy · (x − μ) · σ⁻¹;   db = Σ_rows dy

Numerics. Divisions and square roots are correctly rounded (``div_rn``, ``sqrt_rn``). The RMSNorm forward
differs from torch's only through r: the row sum runs in another order (and torch's vectorised CPU rsqrt is not
always 1/sqrt), so r is within 2 ulp of torch's (tests/kernels/test_triton_norm.py checks it).
``rms_norm_forward(..., rstd=)`` takes torch's own r and then matches torch bit for bit. Casts to bfloat16
round to nearest even by integer arithmetic (``_round_to``): Triton's interpreter truncates on fp32 → bf16,
and doing it one way everywhere keeps GPU and interpreter alike.

Weight/bias gradients are deterministic: program p sums the rows [p·rows_per_program, (p+1)·rows_per_program)
into row p of an fp32 (fp64) partial buffer, then torch sums the buffer over programs. No atomics anywhere.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors; every load is
upcast to the compute dtype right away (bf16 arithmetic in the interpreter is garbage).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_forward", "rms_norm_backward", "layer_norm_forward", "layer_norm_backward",
           "MAX_HIDDEN_SIZE"]

MAX_HIDDEN_SIZE = 65536  # one row must fit a program's registers / shared memory


# ----------------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """``v`` (float32/float64) rounded to nearest even in ``DTYPE``; bfloat16 by integer arithmetic."""
    if DTYPE == tl.bfloat16:
        v = v.to(tl.float32)
        bits = v.to(tl.uint32, bitcast=True)
        # add 0x7FFF plus the lowest kept bit, then drop the low 16 bits: round half to even
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a quiet NaN (no carry into the sign)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _div_rn(a, b, COMPUTE: tl.constexpr):
    """a / b correctly rounded (plain ``/`` on GPU is an approximate division in float32)."""
    if COMPUTE == tl.float64:
        return a / b  # float64 division is IEEE
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _sqrt_rn(a, COMPUTE: tl.constexpr):
    """sqrt(a) correctly rounded (``tl.sqrt`` is approximate in float32, ``sqrt_rn`` takes float32 only)."""
    if COMPUTE == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


# Integer sizes are never specialised: a value of 1 would otherwise become a constexpr (no ``.to``).
_NO_SPEC = ["n_rows", "n_cols", "rows_per_program"]


@triton.jit(do_not_specialize=["n_cols"])
def _rms_norm_fwd_kernel(
    X,  # *x: [n_rows, n_cols], elements of a row contiguous
    stride_x,  # elements between consecutive rows of X
    W,  # *weight: [n_cols]; not read when HAS_WEIGHT is False
    Y,  # *y: [n_rows, n_cols] output, contiguous rows; its dtype picks the product dtype (Llama order)
    stride_y,  # elements between consecutive rows of Y
    RSTD,  # *float32: [n_rows], r = 1/rms per row; written, or read when RSTD_GIVEN
    n_cols,  # hidden size
    eps,  # float32
    offset,  # float32 weight offset (1.0 for Gemma); used only when GEMMA
    BLOCK: tl.constexpr,  # next power of two ≥ n_cols
    HAS_WEIGHT: tl.constexpr,
    GEMMA: tl.constexpr,  # offset ≠ 0: y = (x·r·(offset + w₃₂)).to(x.dtype); else Llama's cast-then-multiply
    RSTD_GIVEN: tl.constexpr,  # use the r stored in RSTD instead of computing it
):
    """Frozen RMSNorm forward, one row per program.

    r = 1 / sqrt(Σ x₃₂² / n_cols + eps);  n = x₃₂ · r
    GEMMA:       y = (n · (offset + w₃₂)).to(x.dtype)
    Llama:       y = w · n.to(x.dtype), the product rounded once to Y's dtype (float64 if Y is float64)
    no weight:   y = n.to(x.dtype)
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RSTD_GIVEN:
        r = tl.load(RSTD + row)
    else:
        mean_sq = tl.math.div_rn(tl.sum(x * x, axis=0), n_cols.to(tl.float32))
        r = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(mean_sq + eps))
        tl.store(RSTD + row, r)
    normed = x * r
    if HAS_WEIGHT:
        if GEMMA:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = normed * (offset + w)
        else:
            # Llama: cast to x's dtype first, then multiply by w in the promoted dtype. Products of two
            # fp16/bf16/fp32-representable values are computed in fp32 (exact for 16-bit operands) and
            # rounded once on store, which is what torch does for a 16-bit product.
            normed = _round_to(normed, X.dtype.element_ty)
            if Y.dtype.element_ty == tl.float64:
                y = normed.to(tl.float64) * tl.load(W + cols, mask=mask, other=0.0).to(tl.float64)
            else:
                y = normed.to(tl.float32) * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        y = normed
    tl.store(Y + row * stride_y + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _rms_norm_bwd_kernel(
    DY,  # *dy: [n_rows, n_cols], elements of a row contiguous
    stride_dy,
    X,  # *x: [n_rows, n_cols]; read only when NEED_DW
    stride_x,
    W,  # *weight: [n_cols]; read only when HAS_WEIGHT
    RSTD,  # *float32: [n_rows] saved r
    DX,  # *dx: [n_rows, n_cols] output in x's dtype; written only when NEED_DX
    stride_dx,
    DW_PART,  # *COMPUTE: [n_programs, n_cols] partial dw, row p = this program's rows; only when NEED_DW
    n_rows,
    n_cols,
    rows_per_program,  # program p handles rows [p·rows_per_program, (p+1)·rows_per_program) ∩ [0, n_rows)
    offset,  # float32 weight offset (w_eff = offset + w; 1 without a weight)
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    GEMMA: tl.constexpr,  # dw uses the float32 normalised value (else the value cast to x's dtype)
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 gradients
):
    """Frozen RMSNorm backward over a block of rows.

    dx = dy · (w_eff · r),  w_eff = offset + w (1 without a weight: y = x · r), in COMPUTE, cast to x's dtype
    dw_part[p] = Σ_{rows of p} dy · n,  n = (x₃₂ · r).to(x.dtype) (Llama) or x₃₂ · r (GEMMA)
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w_eff = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE) + offset
    else:
        w_eff = tl.full((), 1.0, COMPUTE)
    dw_acc = tl.full((BLOCK,), 0.0, COMPUTE)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row · stride may pass 2³¹
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
        r = tl.load(RSTD + row)
        if NEED_DX:
            dx = dy * (w_eff * r.to(COMPUTE))  # the torch backend's order: bit for bit the same
            tl.store(DX + row * stride_dx + cols, _round_to(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            normed = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * r
            if not GEMMA:
                normed = _round_to(normed, X.dtype.element_ty)
            dw_acc += dy * normed.to(COMPUTE)
    if NEED_DW:
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


@triton.jit(do_not_specialize=["n_cols"])
def _layer_norm_fwd_kernel(
    X,  # *x: [n_rows, n_cols], elements of a row contiguous
    stride_x,
    W,  # *weight: [n_cols]; read only when HAS_WEIGHT
    B,  # *bias: [n_cols]; read only when HAS_BIAS
    Y,  # *y: [n_rows, n_cols] output in x's dtype
    stride_y,
    MEAN,  # *COMPUTE: [n_rows] saved mean
    RSTD,  # *COMPUTE: [n_rows] saved 1/σ
    n_cols,
    eps_hi,  # float32(eps)
    eps_lo,  # eps − float32(eps): float64 rows see eps to ~48 bits, float32 rows see eps_hi
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    """Frozen LayerNorm forward (= the ordinary one), one row per program.

    μ = Σx / n_cols;  σ⁻¹ = 1 / sqrt(Σ(x − μ)² / n_cols + eps)
    y = ((x − μ) · σ⁻¹) · w + b, cast to x's dtype
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    n = n_cols.to(COMPUTE)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
    mean = _div_rn(tl.sum(x, axis=0), n, COMPUTE)
    xc = tl.where(mask, x - mean, 0.0)
    var = _div_rn(tl.sum(xc * xc, axis=0), n, COMPUTE)
    eps = tl.full((), 0.0, COMPUTE) + eps_hi + eps_lo  # float32: eps_hi exactly; float64: eps to ~48 bits
    rstd = _div_rn(tl.full((), 1.0, COMPUTE), _sqrt_rn(var + eps, COMPUTE), COMPUTE)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(COMPUTE)
    tl.store(Y + row * stride_y + cols, _round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _layer_norm_bwd_kernel(
    DY,  # *dy: [n_rows, n_cols], elements of a row contiguous
    stride_dy,
    X,  # *x: [n_rows, n_cols]; read only when NEED_DW
    stride_x,
    W,  # *weight: [n_cols]; read only when HAS_WEIGHT
    MEAN,  # *[n_rows] saved mean; read only when NEED_DW
    RSTD,  # *[n_rows] saved 1/σ
    DX,  # *dx: [n_rows, n_cols] output in x's dtype; written only when NEED_DX
    stride_dx,
    DW_PART,  # *COMPUTE: [n_programs, n_cols] partial dw; only when NEED_DW
    DB_PART,  # *COMPUTE: [n_programs, n_cols] partial db; only when NEED_DB
    n_rows,
    n_cols,
    rows_per_program,  # program p handles rows [p·rows_per_program, (p+1)·rows_per_program) ∩ [0, n_rows)
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for float64 gradients
):
    """Frozen LayerNorm backward over a block of rows (σ constant, μ not).

    g = dy · w;  dx = (g − Σg / n_cols) · σ⁻¹, cast to x's dtype
    dw_part[p] = Σ_{rows of p} (dy · (x − μ)) · σ⁻¹;  db_part[p] = Σ_{rows of p} dy
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    n = n_cols.to(COMPUTE)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
    dw_acc = tl.full((BLOCK,), 0.0, COMPUTE)
    db_acc = tl.full((BLOCK,), 0.0, COMPUTE)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row · stride may pass 2³¹
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.load(RSTD + row).to(COMPUTE)
        if NEED_DX:
            if HAS_WEIGHT:
                gw = g * w
            else:
                gw = g
            # masked lanes hold 0, so the sum covers exactly the row
            dx = (gw - _div_rn(tl.sum(gw, axis=0), n, COMPUTE)) * rstd
            tl.store(DX + row * stride_dx + cols, _round_to(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
            mean = tl.load(MEAN + row).to(COMPUTE)
            dw_acc += g * (x - mean) * rstd
        if NEED_DB:
            db_acc += g
    if NEED_DW:
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, db_acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launch wrappers


def _interpreting() -> bool:
    """True when these kernels can run under the interpreter: decorated with TRITON_INTERPRET=1, and so was
    triton.language itself (``tl.sum`` is a jit function; if triton was imported before the variable was set,
    e.g. by a transformers model module, the interpreter cannot call it)."""
    return not any(isinstance(f, triton.runtime.JITFunction) for f in (_rms_norm_fwd_kernel, tl.sum))


def _check_device(*tensors) -> None:
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"gim_fast.kernels.norm: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"gim_fast.kernels.norm: the Triton norm kernels need CUDA tensors (got {device}); on CPU they run only "
        "under the Triton interpreter (TRITON_INTERPRET=1 set before anything imports triton; importing a "
        "transformers model module does), or use backend='torch'")


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    if n_cols < 1:
        raise ValueError("gim_fast.kernels.norm: the hidden size must be at least 1")
    if n_cols > MAX_HIDDEN_SIZE:
        raise ValueError(f"gim_fast.kernels.norm: hidden size {n_cols} exceeds {MAX_HIDDEN_SIZE} (one row per program)")
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[n_rows, n_cols]`` rows with contiguous elements (a view whenever the strides allow)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _partition(n_rows: int, device: torch.device, need_reduction: bool) -> tuple[int, int]:
    """(n_programs, rows_per_program): one row per program unless a weight/bias gradient is summed, then a
    fixed number of row blocks (a few per SM on GPU) so that the partial buffer stays small."""
    if not need_reduction:
        return n_rows, 1
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    rows_per_program = triton.cdiv(n_rows, min(n_rows, target))
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0,
                     rstd: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen RMSNorm forward over the last dim of ``x`` (any leading shape, any row stride).

    Returns ``(y, rstd)``: ``y`` in x's dtype (Llama order with a weight: ``promote(w.dtype, x.dtype)``) and
    ``rstd`` float32 of shape ``x.shape[:-1]``. Pass ``rstd`` (float32, ``x.shape[:-1]``, e.g. torch's own)
    to skip the row reduction and use it as is.
    """
    _check_device(x, weight, rstd)
    n_cols = x.shape[-1]
    block, num_warps = _block_and_warps(n_cols)
    gemma = weight is not None and float(offset) != 0.0
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if weight is not None and not gemma else x.dtype
    x2 = _rows(x)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rstd is None:
        rstd_out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    else:
        if rstd.dtype != torch.float32 or rstd.numel() != n_rows:
            raise ValueError("gim_fast.kernels.norm: rstd must be float32 with one value per row")
        rstd_out = rstd.reshape(x.shape[:-1]).contiguous()
    if n_rows == 0:
        return y, rstd_out
    w = weight if weight is None else weight.contiguous()
    _rms_norm_fwd_kernel[(n_rows,)](
        x2, _row_stride(x2), w if w is not None else x2, y, n_cols, rstd_out, n_cols, float(eps), float(offset),
        BLOCK=block, HAS_WEIGHT=weight is not None, GEMMA=gemma, RSTD_GIVEN=rstd is not None,
        num_warps=num_warps)
    return y, rstd_out


def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
                      rstd: torch.Tensor, offset: float = 0.0, need_weight_grad: bool = False, *,
                      x_dtype: torch.dtype | None = None, need_input_grad: bool = True):
    """Frozen RMSNorm backward: ``(dx, dw)``, either ``None`` when not asked for.

    ``dx = dy · (offset + w) · r`` in float32 (float64 for float64 gradients), cast to x's dtype (``x_dtype``
    when ``x`` is not given); ``dw = Σ dy · n`` (n as in the forward), deterministic, in weight's dtype.
    ``x`` is needed only for ``dw``.
    """
    need_weight_grad = bool(need_weight_grad and weight is not None)
    if need_weight_grad and x is None:
        raise ValueError("gim_fast.kernels.norm: rms_norm_backward needs x for the weight gradient")
    x_dtype = x.dtype if x is not None else x_dtype
    if need_input_grad and x_dtype is None:
        raise ValueError("gim_fast.kernels.norm: rms_norm_backward needs x or x_dtype for the input gradient")
    _check_device(grad_out, x, weight, rstd)
    n_cols = grad_out.shape[-1]
    block, num_warps = _block_and_warps(n_cols)
    compute = torch.promote_types(grad_out.dtype, torch.float32)
    dy2 = _rows(grad_out)
    n_rows = dy2.shape[0]
    x2 = _rows(x) if need_weight_grad else dy2
    dx = torch.empty(grad_out.shape, dtype=x_dtype, device=grad_out.device) if need_input_grad else None
    if n_rows == 0 or not (need_input_grad or need_weight_grad):
        dw = torch.zeros_like(weight) if need_weight_grad else None
        return dx, dw
    n_programs, rows_per_program = _partition(n_rows, grad_out.device, need_weight_grad)
    dw_part = (torch.empty((n_programs, n_cols), dtype=compute, device=grad_out.device)
               if need_weight_grad else dy2)
    w = weight.contiguous() if weight is not None else dy2
    rstd = rstd.reshape(-1).contiguous()
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2, _row_stride(dy2), x2, _row_stride(x2), w, rstd,
        dx if dx is not None else dy2, n_cols, dw_part, n_rows, n_cols, rows_per_program, float(offset),
        BLOCK=block, HAS_WEIGHT=weight is not None, GEMMA=float(offset) != 0.0,
        NEED_DX=need_input_grad, NEED_DW=need_weight_grad, COMPUTE=_TL_DTYPES[compute], num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if need_weight_grad else None
    return dx, dw


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """LayerNorm forward over the last dim of ``x`` (any leading shape, any row stride).

    Returns ``(y, mean, rstd)``: ``y`` in x's dtype; ``mean`` and ``rstd`` of shape ``x.shape[:-1]`` in float32
    (float64 for float64 inputs).
    """
    _check_device(x, weight, bias)
    n_cols = x.shape[-1]
    block, num_warps = _block_and_warps(n_cols)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = _rows(x)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=compute, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=compute, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    eps_hi = float(torch.tensor(float(eps), dtype=torch.float32))
    eps_lo = float(eps) - eps_hi
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    _layer_norm_fwd_kernel[(n_rows,)](
        x2, _row_stride(x2), w, b, y, n_cols, mean, rstd, n_cols, eps_hi, eps_lo,
        BLOCK=block, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COMPUTE=_TL_DTYPES[compute],
        num_warps=num_warps)
    return y, mean, rstd


def layer_norm_backward(grad_out: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
                        mean: torch.Tensor | None, rstd: torch.Tensor, need_weight_grad: bool = False,
                        need_bias_grad: bool = False, *, x_dtype: torch.dtype | None = None,
                        bias_dtype: torch.dtype | None = None, need_input_grad: bool = True):
    """Frozen LayerNorm backward: ``(dx, dw, db)``, each ``None`` when not asked for.

    ``g = dy · w``, ``dx = (g − mean(g)) · σ⁻¹`` cast to x's dtype (``x_dtype`` when ``x`` is not given);
    ``dw = Σ dy · (x − μ) · σ⁻¹`` in weight's dtype (needs ``x`` and ``mean``); ``db = Σ dy`` in
    ``bias_dtype`` (default: grad_out's dtype). Float32 math, float64 for float64 gradients; deterministic.
    """
    need_weight_grad = bool(need_weight_grad and weight is not None)
    need_bias_grad = bool(need_bias_grad)
    if need_weight_grad and (x is None or mean is None):
        raise ValueError("gim_fast.kernels.norm: layer_norm_backward needs x and mean for the weight gradient")
    x_dtype = x.dtype if x is not None else x_dtype
    if need_input_grad and x_dtype is None:
        raise ValueError("gim_fast.kernels.norm: layer_norm_backward needs x or x_dtype for the input gradient")
    _check_device(grad_out, x, weight, mean, rstd)
    n_cols = grad_out.shape[-1]
    block, num_warps = _block_and_warps(n_cols)
    compute = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    dy2 = _rows(grad_out)
    n_rows = dy2.shape[0]
    x2 = _rows(x) if need_weight_grad else dy2
    dev = grad_out.device
    dx = torch.empty(grad_out.shape, dtype=x_dtype, device=dev) if need_input_grad else None
    bias_dtype = bias_dtype or grad_out.dtype
    if n_rows == 0 or not (need_input_grad or need_weight_grad or need_bias_grad):
        dw = torch.zeros_like(weight) if need_weight_grad else None
        db = torch.zeros(n_cols, dtype=bias_dtype, device=dev) if need_bias_grad else None
        return dx, dw, db
    n_programs, rows_per_program = _partition(n_rows, dev, need_weight_grad or need_bias_grad)
    dw_part = torch.empty((n_programs, n_cols), dtype=compute, device=dev) if need_weight_grad else dy2
    db_part = torch.empty((n_programs, n_cols), dtype=compute, device=dev) if need_bias_grad else dy2
    w = weight.contiguous() if weight is not None else dy2
    mean = mean.reshape(-1).contiguous() if need_weight_grad else rstd
    rstd = rstd.reshape(-1).contiguous()
    _layer_norm_bwd_kernel[(n_programs,)](
        dy2, _row_stride(dy2), x2, _row_stride(x2), w, mean, rstd,
        dx if dx is not None else dy2, n_cols, dw_part, db_part, n_rows, n_cols, rows_per_program,
        BLOCK=block, HAS_WEIGHT=weight is not None, NEED_DX=need_input_grad, NEED_DW=need_weight_grad,
        NEED_DB=need_bias_grad, COMPUTE=_TL_DTYPES[compute], num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if need_weight_grad else None
    db = db_part.sum(0).to(bias_dtype) if need_bias_grad else None
    return dx, dw, db
