"""Fused GIM attention: a FlashAttention-2 style forward and a GIM backward, in Triton.

Shapes: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` with ``G = Hq / Hkv`` query heads per KV head (GQA/MQA by
indexing, ``kv_head = q_head // G``; K and V are never repeated). Any strides, any S, D up to 256. The backward
also takes a stack of M cotangents ``dO [M, B, Hq, S, D]`` against one forward (see :func:`attention_backward`).

The math, per query row i, with S the scores exactly as the softmax sees them (scaled, soft-capped, masked):

    forward    S    = cap·tanh(scale·q kᵀ / cap)     (or scale·q kᵀ without soft-capping), −inf where masked
               P    = softmax(S),  O = P V,  LSE = log Σ exp S
               P_T  = softmax(S/T),  LSE_T = log Σ exp(S/T),  O_T = P_T V      (temperature on, backward to follow)
    backward   dP   = dO Vᵀ
               Δ_T  = rowsum(dP ⊙ P_T) = rowsum(dO ⊙ O_T)
               dS   = P_T ⊙ (dP − Δ_T)                          (GIM: no 1/T factor; T off gives P_T = P)
               dS  ← dS ⊙ (1 − tanh²)                           (soft-capping)
               dQ   = q_scale·scale·dS K,   dK = k_scale·scale·dSᵀ Q,   dV = v_scale·Pᵀ dO   (the TRUE P)

A query row with no allowed key outputs 0, gets LSE = +inf (so every recomputed P is 0) and passes no gradient.

All exponentials run in the exp2 domain: the kernels carry S·log2(e) (S·log2(e)/2 in the T = 2 forward, where
u = exp2 of it gives P_T ∝ u and P ∝ u²). Without soft-capping the scale is folded into the exponent, so each
score costs one FFMA and one EX2. LSE and LSE_T are stored in natural-log units (comparable with the torch
backend); the kernels convert with one multiply per row.

Two-stage loops (masking every tile costs instructions in every iteration, and on Hopper a mask built from the
causal bound serialises the warpgroup MMA chain). Every kernel walks the tiles of the other sequence axis in two stages: an *unmasked* stage over the tiles that lie
entirely inside the causal/window band, inside the sequence and inside the key span known to be all real tokens —
no mask is built, no bound is checked — and a *masked* stage over the rest (the diagonal, the window's edge, the
ragged end, tiles touching padding). Tiles outside the band, or made only of padded keys, are never visited.
Padding is summarised per sequence by the launcher (``_padding_spans``, device-side, no host sync): the span of
real keys [first, last] and, when every key in that span is real (left or right padding), the same span as the
"all real" span; a mask with holes gets an empty all-real span, so its tiles all go through the masked stage.

Kernels (no float atomics anywhere, so gradients are bit-identical run to run):
    _attn_fwd_kernel        grid (B·Hq, query blocks): loops over the visible key tiles; causal: the last
                            (heaviest) query blocks are launched first
    _attn_bwd_delta_kernel  grid (M·B·Hq, query blocks): Δ_T = rowsum(dO ⊙ O_T)
    _attn_bwd_dkdv_kernel   grid (M·B·Hkv, key blocks): one program per key block of a KV head computes its dK/dV
                            over all G query heads of the group: their rows are *stacked* position-major
                            (row r of a tile = query position p0 + r // G of head r % G), so each tile is
                            BLOCK_M rows wide whatever G is, the S and dP GEMMs are BLOCK_M (≥ 64) wide, and the
                            GQA reduction happens in registers, in a fixed order. Key block 0, which every causal
                            query sees, is launched first (heaviest first).
    _attn_bwd_dq_kernel     grid (M·B·Hq, query blocks): loops over the key tiles its queries can see

Targets: every architecture of ``kernels/archs.py`` (NVIDIA sm_80 to sm_120, AMD gfx942/gfx950), each with its own
configuration table (``_CONFIGS``; the launcher picks it from the device: :func:`config_table`). Two constexpr flags
carry what the source must know of the target: ``PTX`` (an NVIDIA target: 1/x as one inline-PTX ``rcp.approx``)
and ``TMEM`` (the sm_100 family, whose dot accumulators live in tensor memory: see :func:`_block_max`).
``bench/compile_report.py --arch ARCH`` compiles every shipped configuration for any of them without a GPU.

Interpreter notes (TRITON_INTERPRET=1, how the CPU tests run): every load is upcast to float32 at once (bf16
loads/dots give garbage there), dots are float32 "ieee", one fixed small block configuration (autotune needs a
GPU; small blocks make the tests cross every kind of tile cheaply), tanh is written with exp2, and O/dQ/dK/dV are
stored in float32 and rounded by torch (the interpreter's float32 → bf16 cast truncates). On a GPU with fp16/bf16
inputs (``FAST_MMA``) the dot operands stay 16-bit (P and dS are cast to the input dtype before their dots) and
the accumulators stay float32; fp32 inputs use exact ("ieee") dots, not TF32.

Why Δ_T from O_T, accumulated in the forward pass, rather than a first backward pass over the keys: the extra
forward work is one [BLOCK_M, BLOCK_N] × [BLOCK_N, D] matmul per tile (P_T V; the exp for P_T is needed anyway
for LSE_T), and Δ_T then costs one cheap elementwise kernel reading O_T. A separate backward pass would recompute
both Q Kᵀ and dO Vᵀ per tile (two matmuls and an exp): twice the extra matmul work. The price is one fp32
[B, Hq, S, D] buffer per layer (fp32 so that Δ_T, whose error enters every dS, is not rounded to 16 bits),
paid only when a backward follows and the temperature is on. (The argument counts FLOPs.)
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .archs import ARCHS, CONSERVATIVE, KernelCompileError, device_arch

__all__ = ["attention_forward", "attention_backward", "KernelCompileError"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): exp(x) = exp2(x·log2 e)


# ----------------------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _rcp(x, PTX: tl.constexpr):
    """1/x: one MUFU.RCP (rcp.approx.ftz, ≤ 1 ulp) on NVIDIA targets (``PTX``: inline PTX allowed); a plain
    division elsewhere (AMD, the interpreter)."""
    if PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _exp_factors(scale, softcap, unit, HAS_SOFTCAP: tl.constexpr):
    """``(c, cap_in, cap_out)``: with x = raw q·k, or the soft-capped score tanh(q·k · cap_in) · cap_out (in log2
    units), x·c = S·log2e·unit. Soft-capping: c = 1, cap_in = scale/softcap, cap_out = softcap·log2e·unit; else
    c = scale·log2e·unit, cap_in = cap_out = 1."""
    if HAS_SOFTCAP:
        c = 1.0
        cap_in = scale / softcap
        cap_out = softcap * _LOG2E * unit
    else:
        c = scale * _LOG2E * unit
        cap_in = 1.0
        cap_out = 1.0
    return c, cap_in, cap_out


@triton.jit
def _tanh(x, PTX: tl.constexpr):
    """tanh(x) = 1 − 2/(1 + e^{2x}): an EX2, an RCP and three FMA-class instructions; ±1 for large |x| (e → ∞
    or 0), absolute error ~1e-7 (what the scores need: they enter exponentials and 1 − tanh², both absolute)."""
    return 1.0 - 2.0 * _rcp(1.0 + tl.exp2(x * (2.0 * _LOG2E)), PTX)


@triton.jit
def _in_band(rel, cols, window, HAS_WINDOW: tl.constexpr):
    """Key j = j0 + cols is in query i's causal band (j ≤ i) or window band (0 ≤ i − j < w; a window is always
    causal), given rel = i − j0 per row and the tile's column numbers cols = arange: per-row values against
    per-column constants, so the compare needs no per-column index registers. rel and cols broadcast ([M,1]×[1,N])."""
    if HAS_WINDOW:
        return (rel - cols).to(tl.uint32, bitcast=True) < window.to(tl.uint32)
    else:
        return cols <= rel


@triton.jit
def _load_pair(a_ptrs, b_ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr,
               FAST_MMA: tl.constexpr):
    """Load two [rows, BLOCK_D] tiles laid out alike (K and V, or Q and dO), zeros where masked: rows by
    ``row_ok`` when MASK_ROWS, the padded head dim by ``d_ok`` when MASK_D; float32 unless the dots take 16-bit
    operands. (One helper for both: each helper call costs milliseconds under the interpreter.)"""
    if MASK_ROWS and MASK_D:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif MASK_ROWS:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_D:
        a = tl.load(a_ptrs, mask=d_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    if not FAST_MMA:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _padding_span(kvr):
    """(first, end, all_real_first, all_real_end) of one sequence's keys, from ``_padding_spans``."""
    return tl.load(kvr), tl.load(kvr + 1), tl.load(kvr + 2), tl.load(kvr + 3)


@triton.jit
def _split(lo, hi, inner_lo, inner_end, STEP: tl.constexpr):
    """Split the tiles [t, t + STEP), t = lo, lo + STEP, … < hi into the two stages.

    Returns (u_lo, u_hi, n_left, n_masked): the tiles from u_lo to u_hi lie entirely inside [inner_lo, inner_end)
    (the unmasked stage); the other n_masked tiles — n_left of them from lo, the rest from u_hi — are the masked
    stage: the i-th starts at lo + i·STEP if i < n_left, else at u_hi + (i − n_left)·STEP."""
    hi = tl.maximum(hi, lo)
    u_lo = lo + tl.cdiv(tl.maximum(inner_lo - lo, 0), STEP) * STEP
    u_lo = tl.minimum(u_lo, hi)
    u_hi = u_lo + tl.maximum(tl.minimum(inner_end, hi) - u_lo, 0) // STEP * STEP
    n_left = tl.cdiv(u_lo - lo, STEP)
    return u_lo, u_hi, n_left, n_left + tl.cdiv(hi - u_hi, STEP)


@triton.jit
def _key_stages(start_m, seq_len, window, kvr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr):
    """Key tiles of the query rows [start_m, start_m + BLOCK_M) (forward, dQ), as :func:`_split` returns them
    plus lo: visible keys [lo, hi), lo aligned to BLOCK_N; the tile at n is unmasked when n ≥ start_m + BLOCK_M − w
    (window: j > i − w for the last row), n + BLOCK_N ≤ start_m + 1 (causal: j ≤ i for the first row), the tile is
    inside the sequence and inside the all-real key span."""
    lo = 0
    hi = seq_len
    inner_lo = 0
    inner_end = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
        inner_end = tl.minimum(seq_len, start_m + 1)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - window + 1)
        inner_lo = start_m + BLOCK_M - window
    if HAS_PAD:
        first, end, real_first, real_end = _padding_span(kvr)
        lo = tl.maximum(lo, first)
        hi = tl.minimum(hi, end)
        inner_lo = tl.maximum(inner_lo, real_first)
        inner_end = tl.minimum(inner_end, real_end)
    lo = lo // BLOCK_N * BLOCK_N
    u_lo, u_hi, n_left, n_masked = _split(lo, hi, inner_lo, inner_end, BLOCK_N)
    return lo, u_lo, u_hi, n_left, n_masked


@triton.jit
def _query_stages(start_n, seq_len, window, kvr, BLOCK_N: tl.constexpr, POS: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr):
    """Query tiles of POS positions each that see the keys [start_n, start_n + BLOCK_N) (dK/dV), as
    :func:`_split` returns them plus lo. Causal: i ≥ start_n; window: i < start_n + BLOCK_N − 1 + w. A tile is
    unmasked when its first position is ≥ start_n + BLOCK_N − 1 (causal), its last < start_n + w (window) and it
    is inside the sequence. Keys need no check here (a padded key, or one past the end, touches only its own
    dK/dV row); a key block of padding only has no tiles at all."""
    lo = 0
    hi = seq_len
    inner_lo = 0
    inner_end = seq_len
    if CAUSAL:
        lo = start_n
        inner_lo = start_n + BLOCK_N - 1
    if HAS_WINDOW:
        hi = tl.minimum(seq_len, start_n + BLOCK_N - 1 + window)
        inner_end = tl.minimum(seq_len, start_n + window)
    if HAS_PAD:   # a block of padded keys only: nothing to do
        first, end, _, _ = _padding_span(kvr)
        hi = tl.where((start_n >= end) | (start_n + BLOCK_N <= first), lo, hi)
    u_lo, u_hi, n_left, n_masked = _split(lo, hi, inner_lo, inner_end, POS)
    return lo, u_lo, u_hi, n_left, n_masked


@triton.jit
def _key_tile(q, k_tile, v_tile, start_n, offs_m, offs_n0, d_ok, kpm_b, stride_ks, stride_vs, stride_ms,
              seq_len, window, cap_in, cap_out, MASKED: tl.constexpr, MASK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
              FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr, PTX: tl.constexpr):
    """For the row-major kernels (forward, dQ): load the key tile at ``start_n`` of K and V and return
    (k, v, x, tanh): x the scores — raw q·k, or soft-capped in log2 units — masked to −inf where a query of
    ``offs_m`` may not attend (in the masked stage only), tanh for the soft-cap derivative 1 − tanh²."""
    off = tl.cast(start_n, tl.int64)
    col_ok = offs_n0 < seq_len - start_n
    k, v = _load_pair(k_tile + off * stride_ks, v_tile + off * stride_vs, col_ok, d_ok, MASKED, MASK_D, FAST_MMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:   # x = cap·tanh(scale·qk/cap) in the kernel's log2 units (cap_out = cap·log2e·unit)
        tanh = _tanh(qk * cap_in, PTX)
        x = tanh * cap_out
    else:             # x = qk: the caller folds scale·log2e·unit into its exponent (tanh: unused placeholder)
        tanh = qk
        x = qk
    if MASKED:
        key_ok = col_ok             # keys past the end and padded keys are out of every row's softmax
        if HAS_PAD:
            key_ok = tl.load(kpm_b + (start_n + offs_n0) * stride_ms, mask=col_ok, other=0) != 0
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & _in_band((offs_m - start_n)[:, None], offs_n0[None, :], window, HAS_WINDOW)
        x = tl.where(ok, x, float("-inf"))
    return k, v, x, tanh


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _block_max(v, TMEM: tl.constexpr):
    """max of a [BLOCK_M] row vector: one scalar for the whole block. ``TMEM``: the vector first passes through a
    scan along a length-1 axis (a no-op on the values) because Triton's tensor-memory layout pass
    (``TritonNvidiaGPUOptimizeTMemLayoutsPass``) follows a tensor-memory load's users through elementwise ops and
    reductions and, on a reduction of a rank-1 tensor to a scalar, builds a slice layout of a rank-1 parent:
    the compiler asserts (``parent layout must have at least rank >= 2``) and may take the process with it. A
    scan of a non-blocked layout ends that walk. Minimal reproducer: ``bench/results/triton_tmem_reduce_repro.py``."""
    if TMEM:
        v = tl.max(tl.associative_scan(v[:, None], 1, _max_combine), 1)
    return tl.max(v, 0)


@triton.jit
def _fwd_tile(x, v, m_i, l_i, acc, l_t, acc_t, c, ct, inv_temp, rescale_at, MASKED: tl.constexpr,
              TEMP_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMEM: tl.constexpr):
    """One key tile of the online softmax. The exponent of a score is x·c in the kernel's log2 units (S·log2e,
    or S·log2e/2 for T = 2), and x·ct that of S/T (TEMP_MODE 1: ct = c/T); x = −inf where masked. m is the
    reference the accumulators are taken against (shared by S and S/T: max(S/T) = max(S)/T).

    Unmasked stage (every x finite), lazily: m moves, and the accumulators are rescaled, only on the tiles where
    some row's max exceeds m by more than ``rescale_at`` (one block-wide decision, so the branch is uniform);
    otherwise the tile's exponentials are taken against the stale m and stay ≤ 2^rescale_at. Exact: only the
    reference changes (O = acc / l, LSE = m + log2 l either way). The first tile always moves m off −inf.
    Masked stage: m follows the running max and the accumulators are rescaled on every tile (FlashAttention-2)."""
    m_new = tl.maximum(m_i, tl.max(x, 1) * c)
    if not MASKED:
        if _block_max(m_new - m_i, TMEM) > rescale_at:   # block-uniform: the whole tile moves to its rows' maxima
            if TEMP_MODE == 2:
                alpha_t = tl.exp2(m_i - m_new)
                alpha = alpha_t * alpha_t
            else:
                alpha = tl.exp2(m_i - m_new)
                alpha_t = tl.exp2((m_i - m_new) * inv_temp)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            if TEMP_MODE != 0:
                acc_t = acc_t * alpha_t[:, None]
                l_t = l_t * alpha_t
            m_i = m_new
        if TEMP_MODE == 2:
            u = tl.exp2(x * c - m_i[:, None])
            p = u * u
        else:
            p = tl.exp2(x * c - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if TEMP_MODE == 1:
            u = tl.exp2(x * ct - (m_i * inv_temp)[:, None])
        if TEMP_MODE != 0:
            l_t = l_t + tl.sum(u, 1)
            acc_t = tl.dot(u.to(v.dtype), v, acc_t, input_precision=DOT_PRECISION)
        return m_i, l_i, acc, l_t, acc_t
    # A row that has seen no allowed key yet keeps m = −inf: subtract 0 instead (exp2 gives 0, not NaN).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    if TEMP_MODE == 2:
        u = tl.exp2(x * c - m_use[:, None])
        alpha_t = tl.exp2(m_i - m_use)
        p = u * u
        alpha = alpha_t * alpha_t
    else:
        p = tl.exp2(x * c - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    if TEMP_MODE == 1:
        u = tl.exp2(x * ct - (m_use * inv_temp)[:, None])
        alpha_t = tl.exp2((m_i - m_use) * inv_temp)
    if TEMP_MODE != 0:
        l_t = l_t * alpha_t + tl.sum(u, 1)
        acc_t = tl.dot(u.to(v.dtype), v, acc_t * alpha_t[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc, l_t, acc_t


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides, any float dtype
    KPM,                 # uint8 [B,S] key padding mask, nonzero = real token (read only when HAS_PAD)
    KVR,                 # int32 [B,4] padding spans from _padding_spans (read only when HAS_PAD)
    O,                   # out: [B,Hq,S,D] contiguous, q's dtype
    LSE,                 # out: fp32 [B,Hq,S] contiguous, natural-log LSE of S per row (+inf: no allowed key)
    LSE_T,               # out: fp32 [B,Hq,S] contiguous, LSE of S/T (written only when TEMP_MODE != 0)
    O_T,                 # out: fp32 [B,Hq,S,D] contiguous, P_T V (written only when TEMP_MODE != 0)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    n_q_heads, group, seq_len,
    scale, softcap, inv_temp, window,
    seq_bucket,          # next power of two of seq_len: an autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
    TEMP_MODE: tl.constexpr,     # 0: no temperature statistics; 1: any T; 2: T = 2 (one exp serves P and P_T)
    FAST_MMA: tl.constexpr,      # GPU + 16-bit inputs: dot operands stay 16-bit
    DOT_PRECISION: tl.constexpr,
    PTX: tl.constexpr,           # NVIDIA target: inline PTX allowed
    TMEM: tl.constexpr,          # tcgen05 target (sm_100 family): dot accumulators live in tensor memory
):
    """Online softmax over key tiles, one program per (batch·query head, query block).

    With w = the score in log2 units (S·log2e; S·log2e/2 for T = 2): m = running max of w, l = Σ exp2(w − m),
    acc = Σ exp2(w − m)·V, rescaled by exp2(m_old − m_new) when the max moves. O = acc / l, LSE = (m + log2 l)·ln 2.
    With the temperature: l_T = Σ exp2((w − m)/T), acc_T likewise, O_T = acc_T / l_T, LSE_T = (m/T + log2 l_T)·ln 2.
    For T = 2 the units are halved: u = exp2(w − m) gives P_T ∝ u and P ∝ u², and LSE = (2m + log2 l)·ln 2.
    """
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if CAUSAL:   # the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(1) - 1 - pid_m
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hkv = h // group
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_tile = (K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
              + offs_n0[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_tile = (V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
              + offs_n0[:, None] * stride_vs + offs_d[None, :] * stride_vd)
    kpm_b = KPM + b.to(tl.int64) * stride_mb
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not FAST_MMA:
        q = q.to(tl.float32)

    # Exponent units: c turns x (raw q·k, or the soft-capped score in log2 units) into w; ct into w/T.
    unit = 0.5 if TEMP_MODE == 2 else 1.0
    c, cap_in, cap_out = _exp_factors(scale, softcap, unit, HAS_SOFTCAP)
    ct = c * inv_temp
    # Lazy rescaling bound, in m's units: every P (and P_T, for T < 1) of a tile stays ≤ 2^8 (fp16-safe).
    rescale_at = 8.0 * unit / tl.maximum(inv_temp, 1.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TEMP_MODE != 0:
        l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:   # placeholders, never updated
        l_t = l_i
        acc_t = acc

    lo, u_lo, u_hi, n_left, n_masked = _key_stages(start_m, seq_len, window, KVR + b * 4, BLOCK_M, BLOCK_N,
                                                   CAUSAL, HAS_WINDOW, HAS_PAD)
    for start_n in tl.range(u_lo, u_hi, BLOCK_N):            # unmasked stage
        k, v, x, _ = _key_tile(q, k_tile, v_tile, start_n, offs_m, offs_n0, d_ok, kpm_b, stride_ks, stride_vs,
                               stride_ms, seq_len, window, cap_in, cap_out, False, MASK_D, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, HAS_PAD, FAST_MMA, DOT_PRECISION, PTX)
        m_i, l_i, acc, l_t, acc_t = _fwd_tile(x, v, m_i, l_i, acc, l_t, acc_t, c, ct, inv_temp, rescale_at, False,
                                              TEMP_MODE, DOT_PRECISION, TMEM)
    for it in tl.range(0, n_masked):                         # masked stage
        start_n = tl.where(it < n_left, lo + it * BLOCK_N, u_hi + (it - n_left) * BLOCK_N)
        k, v, x, _ = _key_tile(q, k_tile, v_tile, start_n, offs_m, offs_n0, d_ok, kpm_b, stride_ks, stride_vs,
                               stride_ms, seq_len, window, cap_in, cap_out, True, MASK_D, CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, HAS_PAD, FAST_MMA, DOT_PRECISION, PTX)
        m_i, l_i, acc, l_t, acc_t = _fwd_tile(x, v, m_i, l_i, acc, l_t, acc_t, c, ct, inv_temp, rescale_at, True,
                                              TEMP_MODE, DOT_PRECISION, TMEM)

    empty = l_i == 0.0          # no allowed key: output 0, LSE = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # Row index into the contiguous [B,Hq,S] layout as one scalar base + small offsets: 64-bit per-row vectors
    # would stay live across both loops (and spill).
    rows = tl.arange(0, BLOCK_M)
    row_off = pid_bh.to(tl.int64) * seq_len + start_m + rows
    o_ptrs = (pid_bh.to(tl.int64) * seq_len + start_m) * HEAD_DIM + (rows[:, None] * HEAD_DIM + offs_d[None, :])
    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(O + o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    m_lse = m_i * 2.0 if TEMP_MODE == 2 else m_i             # back to S·log2e units
    lse = tl.where(empty, float("inf"), (m_lse + tl.log2(l_safe)) * (1.0 / _LOG2E))
    tl.store(LSE + row_off, lse, mask=row_ok)
    if TEMP_MODE != 0:
        lt_safe = tl.where(empty, 1.0, l_t)
        m_t = m_i if TEMP_MODE == 2 else m_i * inv_temp
        lse_t = (m_t + tl.log2(lt_safe)) * (1.0 / _LOG2E)
        tl.store(LSE_T + row_off, tl.where(empty, float("inf"), lse_t), mask=row_ok)
        tl.store(O_T + o_ptrs, acc_t / lt_safe[:, None], mask=o_mask)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(
    OT,                  # O_T = P_T V [B,Hq,S,D] (O itself when the temperature is off); any strides
    DO,                  # grad of the output [M,B,Hq,S,D]; strides (stride_gm, q's strides)
    DELTA,               # out: fp32 [M,B,Hq,S] contiguous
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gm, stride_qb, stride_qh, stride_qs, stride_qd,
    n_q_heads, n_bh, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ_T[m,b,h,i] = Σ_d dO[m,b,h,i,d]·O_T[b,h,i,d]  (= rowsum(dP ⊙ P_T), the flash-attention "Delta" with P_T);
    one program per (cotangent·batch·query head, row block)."""
    z = tl.program_id(0)
    pid_m = tl.program_id(1)
    bh = z % n_bh
    cot = z // n_bh
    b = bh // n_q_heads
    h = bh % n_q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    ot = tl.load(OT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                 + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + cot.to(tl.int64) * stride_gm + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                 + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + z.to(tl.int64) * seq_len + offs_m, tl.sum(ot * do, 1), mask=offs_m < seq_len)


@triton.jit
def _dkdv_probs(qk, stat, lset2, rel, cols, window, c, ct, cap_in, cap_out, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TEMP_MODE: tl.constexpr,
                PTX: tl.constexpr):
    """(P, P_T, tanh) of a dK/dV score tile, in either orientation: qk the raw scores, stat / lset2 / rel / cols
    the per-row statistics (LSE·log2e, or R for T = 2; LSE_T·log2e), row positions less the key block's start and
    column numbers, each already broadcast to the tile's orientation. x = cap·tanh(qk·cap_in) in log2 units (or
    qk), −inf outside the causal/window band in the masked stage only (rows past the end have P = P_T = 0 already:
    LSE = +inf, R = 0; a padded key, or one past the end, only touches its own dK/dV row, zeroed or not stored at
    the end); P = exp2(x·c − stat) (T = 2: P_T²·R, one exponential per score), P_T = exp2(x·ct − lset2)."""
    if HAS_SOFTCAP:
        tanh = _tanh(qk * cap_in, PTX)
        x = tanh * cap_out
    else:
        tanh = qk
        x = qk
    if MASKED and CAUSAL:
        x = tl.where(_in_band(rel, cols, window, HAS_WINDOW), x, float("-inf"))
    if TEMP_MODE == 0:
        p = tl.exp2(x * c - stat)
        pt = p
    else:
        pt = tl.exp2(x * ct - lset2)
        if TEMP_MODE == 2:
            p = pt * pt * stat
        else:
            p = tl.exp2(x * c - stat)
    return p, pt, tanh


@triton.jit
def _dkdv_tile(k, v, dk, dv, q_c, do_c, lse_c, lset_c, delta_c, q_off, stat_off, p0, pos_r, row_used,
               start_n, cols, offs_d, d_ok, stride_qs, stride_qd, seq_len, window, c, ct,
               cap_in, cap_out,
               MASKED: tl.constexpr, FULL: tl.constexpr, MASK_D: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TEMP_MODE: tl.constexpr,
               FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr, ROWS_MAJOR: tl.constexpr,
               PTX: tl.constexpr):
    """One stacked query tile (positions p0 + pos_r of the heads the rows stand for) against the program's key
    block: P = exp2(S·log2e − LSE·log2e) (T = 2: P_T²·R), P_T = exp2(S·log2e/T − LSE_T·log2e),
    dS = P_T ⊙ (dP − Δ_T) (⊙ (1 − tanh²)), dV += Pᵀ dO, dK += dSᵀ Q. ROWS_MAJOR: S = Q Kᵀ and dP = dO Vᵀ with
    query rows along rows, accumulating dVᵀ += dOᵀ P and dKᵀ += Qᵀ dS (the S/dP GEMMs BLOCK_M × BLOCK_N);
    otherwise transposed tiles, keys along rows: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV += Pᵀ dO, dK += dSᵀ Q. Rows that
    stand for no (head, position) — and, in the masked stage, positions past the end — load as q = dO = 0 with
    LSE = +inf (R = 0), so they contribute exactly 0. Addresses: a scalar base per head chunk (q_c, do_c, lse_c,
    lset_c, delta_c: 64-bit) plus small per-row offsets (32-bit: fewer live registers)."""
    MASK_ROWS: tl.constexpr = MASKED or not FULL
    i = p0 + pos_r
    row_ok = row_used
    if MASKED:
        row_ok = row_ok & (i < seq_len)
    off = tl.cast(p0, tl.int64)
    tile_off = q_off[:, None] + offs_d[None, :] * stride_qd    # 32-bit, the same for q and dO (q's layout)
    q, do = _load_pair((q_c + off * stride_qs) + tile_off, (do_c + off * stride_qs) + tile_off,
                       row_ok, d_ok, MASK_ROWS, MASK_D, FAST_MMA)
    rows = p0 + stat_off
    # The LSE slot holds LSE (T off, any T), or R = exp(2·LSE_T − LSE) for T = 2: P = P_T²·R, one exp per score.
    # Rows past the end or standing for no head: LSE = +inf / R = 0, hence P = 0.
    if TEMP_MODE == 2:
        if MASK_ROWS:
            stat = tl.load(lse_c + rows, mask=row_ok, other=0.0)
        else:
            stat = tl.load(lse_c + rows)
    else:
        if MASK_ROWS:
            stat = tl.load(lse_c + rows, mask=row_ok, other=float("inf")) * _LOG2E
        else:
            stat = tl.load(lse_c + rows) * _LOG2E
    if MASK_ROWS:
        delta = tl.load(delta_c + rows, mask=row_ok, other=0.0)
    else:
        delta = tl.load(delta_c + rows)

    if TEMP_MODE == 0:
        lset2 = stat            # (unused: P_T = P)
    elif MASK_ROWS:
        lset2 = tl.load(lset_c + rows, mask=row_ok, other=float("inf")) * _LOG2E
    else:
        lset2 = tl.load(lset_c + rows) * _LOG2E

    if ROWS_MAJOR:   # S = Q Kᵀ [BLOCK_M, BLOCK_N]: row statistics per row; Pᵀ, dSᵀ go through shared memory
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p, pt, tanh = _dkdv_probs(qk, stat[:, None], lset2[:, None], (i - start_n)[:, None], cols[None, :], window,
                                  c, ct, cap_in, cap_out, MASKED, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, TEMP_MODE, PTX)
        if HAS_SOFTCAP:   # fold the soft-cap derivative in now: one tile live across the dP GEMM, not two
            pt = pt * (1.0 - tanh * tanh)
        dv = tl.dot(tl.trans(do), p.to(do.dtype), dv, input_precision=DOT_PRECISION)     # dVᵀ += dOᵀ P
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = pt * (dp - delta[:, None])
        dk = tl.dot(tl.trans(q), ds.to(q.dtype), dk, input_precision=DOT_PRECISION)       # dKᵀ += Qᵀ dS
    else:            # Sᵀ = K Qᵀ [BLOCK_N, BLOCK_M]: keys along rows, row statistics per column
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t, pt_t, tanh_t = _dkdv_probs(qk_t, stat[None, :], lset2[None, :], (i - start_n)[None, :], cols[:, None],
                                        window, c, ct, cap_in, cap_out, MASKED, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                        TEMP_MODE, PTX)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)    # dV += Pᵀ dO (true P)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)          # dPᵀ = V dOᵀ
        ds_t = pt_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)    # dK += dSᵀ Q
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides
    DO,                  # grad of the output [M,B,Hq,S,D]; strides (stride_gm, q's strides)
    KPM,                 # uint8 [B,S] key padding mask (read only when HAS_PAD)
    KVR,                 # int32 [B,4] padding spans (read only when HAS_PAD)
    LSE,                 # fp32 [B,Hq,S] contiguous, natural-log LSE of S; for T = 2: R = exp(2·LSE_T − LSE)
    LSE_T,               # fp32 [B,Hq,S] contiguous, LSE of S/T (read only when TEMP_MODE != 0)
    DELTA,               # fp32 [M,B,Hq,S] contiguous, Δ_T
    DK, DV,              # out: [M,B,Hkv,S,D] contiguous, k's dtype
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gm,           # dO's cotangent stride (its other strides are q's)
    stride_mb, stride_ms,
    n_kv_heads, n_bkv, seq_len,
    scale, softcap, inv_temp, window,
    dk_factor,           # scale · k_scale (dS is taken w.r.t. the scaled scores)
    dv_factor,           # v_scale
    seq_bucket,          # autotune key only
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
    TEMP_MODE: tl.constexpr, FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PTX: tl.constexpr, TMEM: tl.constexpr,     # the target's flags, as in the forward
    ROWS_MAJOR: tl.constexpr,    # the tiling (a configuration choice): see the docstring
):
    """dK, dV of one key block of one KV head (and cotangent), one program per (cotangent·batch·KV head, key
    block): for the keys j of the block,

        dV[j] = v_scale · Σ_{h,i} P[h,i,j] · dO[h,i]                  (the true P)
        dK[j] = k_scale · scale · Σ_{h,i} dS[h,i,j] · Q[h,i],  dS = P_T ⊙ (dP − Δ_T) (⊙ (1 − tanh²)),  dP = dO Vᵀ

    over the G query heads h of the group and every query position i that sees key j, summed in registers in a
    fixed order (no atomics: deterministic). Its loops mask only the causal/window band: a
    padded key (or one past the end) touches nothing but its own dK/dV row, which is zeroed (or not stored).

    The G heads' rows are stacked position-major: row r of a BLOCK_M-row tile stands for head chunk·HEADS + r % HEADS
    at position p0 + r // HEADS, HEADS = min(G, BLOCK_M) heads and POS = BLOCK_M // HEADS positions per tile (G >
    BLOCK_M: the heads in CHUNKS chunks). A tile thus spans POS positions, and the S/dP GEMMs are BLOCK_M wide
    whatever G is.
    """
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    HEADS: tl.constexpr = min(GROUP, BLOCK_M)
    POS: tl.constexpr = BLOCK_M // HEADS
    CHUNKS: tl.constexpr = (GROUP + HEADS - 1) // HEADS
    FULL: tl.constexpr = (POS * HEADS == BLOCK_M) and (GROUP % HEADS == 0)   # every row a real (head, position)
    z = tl.program_id(0)
    pid_n = tl.program_id(1)
    bkv = z % n_bkv
    cot = z // n_bkv
    b = bkv // n_kv_heads
    hkv = bkv % n_kv_heads
    n_q_heads = n_kv_heads * GROUP
    start_n = pid_n * BLOCK_N

    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k, v = _load_pair(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + start_n.to(tl.int64) * stride_ks
                      + (cols[:, None] * stride_ks + offs_d[None, :] * stride_kd),
                      V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + start_n.to(tl.int64) * stride_vs
                      + (cols[:, None] * stride_vs + offs_d[None, :] * stride_vd), cols < seq_len - start_n, d_ok,
                      True, MASK_D, FAST_MMA)

    # Exponent factors: x·c = S·log2e, x·ct = S·log2e/T (x = raw q·k, or the soft-capped score in log2 units).
    c, cap_in, cap_out = _exp_factors(scale, softcap, 1.0, HAS_SOFTCAP)
    ct = c * inv_temp

    if ROWS_MAJOR:
        dk = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, u_lo, u_hi, n_left, n_masked = _query_stages(start_n, seq_len, window, KVR + b * 4, BLOCK_N, POS,
                                                     CAUSAL, HAS_WINDOW, HAS_PAD)
    r = tl.arange(0, BLOCK_M)
    pos_r = r // HEADS
    head_r = r % HEADS
    q_off = head_r * stride_qh + pos_r * stride_qs         # row r's offset from its chunk's first head, position 0
    stat_off = head_r * seq_len + pos_r                     # the same into the contiguous [.., Hq, S] statistics
    for chunk in tl.static_range(CHUNKS):
        h0 = hkv * GROUP + chunk * HEADS                    # the chunk's first query head
        row_used = (r < POS * HEADS) & (chunk * HEADS + head_r < GROUP)
        q_c = Q + b.to(tl.int64) * stride_qb + h0.to(tl.int64) * stride_qh
        do_c = DO + cot.to(tl.int64) * stride_gm + b.to(tl.int64) * stride_qb + h0.to(tl.int64) * stride_qh
        stat_c = (b * n_q_heads + h0).to(tl.int64) * seq_len                      # into [B,Hq,S]
        delta_c = DELTA + stat_c + cot.to(tl.int64) * n_bkv * GROUP * seq_len     # into [M,B,Hq,S]
        for p0 in tl.range(u_lo, u_hi, POS):                                   # unmasked stage
            dk, dv = _dkdv_tile(k, v, dk, dv, q_c, do_c, LSE + stat_c, LSE_T + stat_c, delta_c, q_off,
                                stat_off, p0, pos_r, row_used, start_n, cols, offs_d, d_ok, stride_qs, stride_qd,
                                seq_len, window, c, ct, cap_in, cap_out, False, FULL, MASK_D, CAUSAL, HAS_WINDOW,
                                HAS_SOFTCAP, TEMP_MODE, FAST_MMA, DOT_PRECISION, ROWS_MAJOR, PTX)
        for it in tl.range(0, n_masked):                                       # masked stage
            p0 = tl.where(it < n_left, lo + it * POS, u_hi + (it - n_left) * POS)
            dk, dv = _dkdv_tile(k, v, dk, dv, q_c, do_c, LSE + stat_c, LSE_T + stat_c, delta_c, q_off,
                                stat_off, p0, pos_r, row_used, start_n, cols, offs_d, d_ok, stride_qs, stride_qd,
                                seq_len, window, c, ct, cap_in, cap_out, True, FULL, MASK_D, CAUSAL, HAS_WINDOW,
                                HAS_SOFTCAP, TEMP_MODE, FAST_MMA, DOT_PRECISION, ROWS_MAJOR, PTX)

    # Everything the stores need is recomputed here from scalars: nothing vector-valued lives across the loops.
    out_off = (z.to(tl.int64) * seq_len + start_n) * HEAD_DIM + (cols[:, None] * HEAD_DIM + offs_d[None, :])
    col_ok = start_n + cols < seq_len      # (not the pre-loop expression: CSE would keep that one live throughout)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    if ROWS_MAJOR:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    dk = dk * dk_factor
    dv = dv * dv_factor
    if HAS_PAD:   # padded keys get no gradient (the loops left them unmasked: they touch only these rows)
        # 32-bit offset (a [B, S] byte mask under 2^31 entries): no 64-bit value lives across the loops for it
        key_ok = tl.load(KPM + (b * stride_mb + (start_n + cols) * stride_ms), mask=col_ok, other=0) != 0
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(q, do, k, v, x, tanh, lset2, delta, dq, ct, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of dQ: P_T = exp2(x·ct − LSE_T·log2e), dP = dO Vᵀ, dS = P_T ⊙ (dP − Δ_T) (⊙ (1 − tanh²)),
    dQ += dS K."""
    pt = tl.exp2(x * ct - lset2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = pt * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - tanh * tanh)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides
    DO,                  # grad of the output [M,B,Hq,S,D]; strides (stride_gm, q's strides)
    KPM,                 # uint8 [B,S] key padding mask (read only when HAS_PAD)
    KVR,                 # int32 [B,4] padding spans (read only when HAS_PAD)
    LSE_T,               # fp32 [B,Hq,S] contiguous: LSE of S/T (LSE itself when the temperature is off)
    DELTA,               # fp32 [M,B,Hq,S] contiguous, Δ_T
    DQ,                  # out: [M,B,Hq,S,D] contiguous, q's dtype
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gm,           # dO's cotangent stride (its other strides are q's)
    stride_mb, stride_ms,
    n_q_heads, n_bh, group, seq_len,
    scale, softcap, inv_temp, window,
    dq_factor,           # scale · q_scale
    seq_bucket,          # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
    TEMP_MODE: tl.constexpr, FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PTX: tl.constexpr, TMEM: tl.constexpr,     # the target's flags, as in the forward
):
    """dQ of one query block, one program per (cotangent·batch·query head, query block); causal: the last
    (heaviest) query blocks first. Over the key tiles its queries see:

        dQ[i] = q_scale · scale · Σ_j dS[i,j] · K[j],   dS = P_T ⊙ (dP − Δ_T) (⊙ (1 − tanh²)),  dP = dO Vᵀ

    (only P_T is needed here; the factor is applied at the store)."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    z = tl.program_id(0)
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    bh = z % n_bh
    cot = z // n_bh
    b = bh // n_q_heads
    h = bh % n_q_heads
    hkv = h // group
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len

    q, do = _load_pair(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                       + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                       DO + cot.to(tl.int64) * stride_gm + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                       + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, row_ok, d_ok, True, MASK_D,
                       FAST_MMA)
    lset2 = tl.load(LSE_T + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + z.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    k_tile = (K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
              + offs_n0[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_tile = (V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
              + offs_n0[:, None] * stride_vs + offs_d[None, :] * stride_vd)
    kpm_b = KPM + b.to(tl.int64) * stride_mb

    # x·ct = S·log2e/T (x = raw q·k, or the soft-capped score in log2 units); T off: inv_temp = 1.
    c, cap_in, cap_out = _exp_factors(scale, softcap, 1.0, HAS_SOFTCAP)
    ct = c * inv_temp

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, u_lo, u_hi, n_left, n_masked = _key_stages(start_m, seq_len, window, KVR + b * 4, BLOCK_M, BLOCK_N,
                                                   CAUSAL, HAS_WINDOW, HAS_PAD)
    for start_n in tl.range(u_lo, u_hi, BLOCK_N):            # unmasked stage
        k, v, x, tanh = _key_tile(q, k_tile, v_tile, start_n, offs_m, offs_n0, d_ok, kpm_b, stride_ks, stride_vs,
                                  stride_ms, seq_len, window, cap_in, cap_out, False, MASK_D, CAUSAL, HAS_WINDOW,
                                  HAS_SOFTCAP, HAS_PAD, FAST_MMA, DOT_PRECISION, PTX)
        dq = _dq_tile(q, do, k, v, x, tanh, lset2, delta, dq, ct, HAS_SOFTCAP, DOT_PRECISION)
    for it in tl.range(0, n_masked):                         # masked stage
        start_n = tl.where(it < n_left, lo + it * BLOCK_N, u_hi + (it - n_left) * BLOCK_N)
        k, v, x, tanh = _key_tile(q, k_tile, v_tile, start_n, offs_m, offs_n0, d_ok, kpm_b, stride_ks, stride_vs,
                                  stride_ms, seq_len, window, cap_in, cap_out, True, MASK_D, CAUSAL, HAS_WINDOW,
                                  HAS_SOFTCAP, HAS_PAD, FAST_MMA, DOT_PRECISION, PTX)
        dq = _dq_tile(q, do, k, v, x, tanh, lset2, delta, dq, ct, HAS_SOFTCAP, DOT_PRECISION)

    dq_off = (z.to(tl.int64) * seq_len + start_m) * HEAD_DIM + (tl.arange(0, BLOCK_M)[:, None] * HEAD_DIM
                                                                + offs_d[None, :])
    tl.store(DQ + dq_off, (dq * dq_factor).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------

# Under the interpreter: one fixed configuration, small and with BLOCK_M != BLOCK_N, so that the CPU tests cross
# block boundaries and meet every kind of tile (inside the band, on its edge, outside it) at small sequence lengths.
# dK/dV: BLOCK_M is the stacked tile (BLOCK_M // G positions of all G heads).
_INTERPRET_CONFIGS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16),
    "dkdv": dict(BLOCK_M=32, BLOCK_N=32, ROWS_MAJOR=True),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
}


# Block configurations (BLOCK_M, BLOCK_N, num_warps, num_stages, *tags), one table per architecture, by padded
# head dim (≤ 64, 128, 256) and kernel. Tags restrict an entry to "T off" / "T on" / "T = 2" (the temperature
# statistics: none, any T, the one-exp T = 2 path), to causal attention ("causal") and/or to "no softcap"; "rows"
# picks the dK/dV kernel's S = Q Kᵀ tiling (ROWS_MAJOR), else it runs Sᵀ = K Qᵀ. dK/dV: BLOCK_M = stacked query
# rows, BLOCK_N = keys.
#
# Every 16-bit entry is screened without a GPU by ``bench/compile_report.py --arch ARCH`` for each architecture
# that runs its table: it compiles with no register spill, within the architecture's shared memory (LDS), with no
# ptxas serialisation warning and — at head dims up to 128 — with every dot on the architecture's own tensor-core
# instruction, for every feature combination it serves (bench/results/compile_report*.md; docs/gpus.md). A
# spilling configuration cannot win on the device, so the tables leave out every tile that spills there.
# fp32 operands go through "ieee" dots (FMA, no tensor cores: a correctness path, not a fast one) and need small
# tiles, the same on every architecture.
#
# Hopper (sm_90a, wgmma): a warpgroup (4 warps) gets 64 accumulator rows of its own; no entry lays 8 warps over 64
# rows (both warpgroups would compute the same S tile and its exponentials) except at head dim 256, where it is the
# only spill-free layout: the second warpgroup holds half of the 256-wide accumulators. At head dim 256 no S/dP
# tile 64 keys wide fits in 255 registers a thread, so the dQ tile is 32 keys wide and the dK/dV tiles 16 keys
# (rows) or 32 stacked rows (keys, on mma.sync): register pressure, not choice (the search:
# bench/results/compile_d256_search.md).
_HOPPER_CONFIGS = {
    64: {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2, "T off", "no softcap")],
        "dkdv": [(64, 128, 8, 2), (64, 64, 4, 2, "no softcap")],
        "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2, "no softcap")],
    },
    128: {
        "fwd": [(128, 64, 8, 2, "T off"), (128, 64, 8, 3, "T off"), (64, 64, 4, 2, "T off"), (64, 64, 4, 3, "T off"),
                (128, 64, 8, 2, "T = 2"), (128, 32, 8, 2, "T on"), (64, 32, 4, 2, "T on")],
        "dkdv": [(128, 64, 8, 2, "rows"), (64, 128, 8, 2, "causal", "no softcap")],
        "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2, "no softcap")],
    },
    256: {
        "fwd": [(64, 32, 8, 2, "T off"), (64, 64, 8, 2, "T off"), (64, 32, 8, 2, "T on", "no softcap"),
                (64, 16, 8, 2, "T on")],
        "dkdv": [(64, 16, 4, 2, "rows"), (32, 32, 8, 2)],
        "dq": [(128, 32, 8, 2)],
    },
}

# mma.sync targets: sm_80, sm_86 and sm_89 run this table (sm_120 a variant of it), each screened for its own
# limits (99 KiB of shared memory on sm_86/89/120, 163 KiB on sm_80). Each warp computes 16-row slices of a dot
# and holds its whole B operand (Kᵀ or V, BLOCK_N × D) in registers, so the key tiles are narrower than on Hopper,
# and 8 warps over 64 rows split each dot 4 × 2 (16 rows × half the columns a warp), which halves the B operand a
# warp holds. The dK/dV kernel prefers the keys-major tiling (Sᵀ = K Qᵀ: K and V are the A operands, 16 key rows
# a warp).
_ADA_CONFIGS = {
    64: {
        "fwd": [(128, 64, 8, 2, "T off"), (64, 64, 8, 2), (128, 32, 8, 2)],
        "dkdv": [(128, 32, 8, 2, "rows"), (64, 64, 8, 2, "T off"), (64, 64, 8, 2, "T = 2"), (32, 64, 4, 2)],
        "dq": [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
    },
    128: {
        "fwd": [(64, 64, 8, 2, "T off"), (128, 32, 8, 2, "T off"), (64, 64, 8, 1, "T on"), (64, 32, 8, 2, "T on")],
        "dkdv": [(64, 64, 8, 2), (128, 32, 8, 2, "rows")],
        "dq": [(64, 64, 8, 2), (128, 32, 8, 2)],
    },
    256: {
        "fwd": [(64, 32, 8, 2, "T off"), (32, 32, 4, 2, "T off"), (32, 16, 4, 2, "T on"), (16, 32, 4, 2, "T on")],
        "dkdv": [(32, 32, 8, 2)],
        "dq": [(32, 32, 4, 2), (32, 16, 4, 2)],
    },
}

# sm_120 (consumer Blackwell, mma.sync, 99 KiB): the mma.sync table less the two forward tiles that spill there
# with soft-capping (128×32 at head dim 128 with T off, 64×64 at head dim 64 with any T other than 2).
_SM120_CONFIGS = {
    64: dict(_ADA_CONFIGS[64], fwd=[(128, 64, 8, 2, "T off"), (64, 64, 8, 2, "T off"), (64, 64, 8, 2, "T = 2"),
                                    (128, 32, 8, 2)]),
    128: dict(_ADA_CONFIGS[128], fwd=[(64, 64, 8, 2, "T off"), (128, 32, 8, 2, "T off", "no softcap"),
                                      (64, 64, 8, 1, "T on"), (64, 32, 8, 2, "T on")]),
    256: _ADA_CONFIGS[256],
}

# sm_100a (B200, tcgen05): the dot accumulators live in tensor memory, not registers, and a 128-row tile is one
# tcgen05 MMA (two warpgroups split its columns when they load it). A single warpgroup on a 64-wide forward tile,
# Hopper's third head-dim-64 forward entry, spills with the temperature statistics here, so it is left out.
_BLACKWELL_CONFIGS = {
    64: {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 1), (128, 128, 8, 2, "T off", "no softcap")],
        "dkdv": [(64, 128, 8, 2), (128, 64, 8, 2, "rows", "causal"), (128, 64, 8, 1, "rows")],
        "dq": [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2)],
    },
    128: {
        "fwd": [(128, 64, 8, 2, "T off"), (128, 32, 8, 2, "T off"), (128, 64, 8, 1), (128, 32, 8, 1, "T on")],
        "dkdv": [(64, 128, 8, 2), (128, 64, 8, 1, "rows"), (64, 64, 4, 2)],
        "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)],
    },
    256: {   # with the temperature statistics every 64-row forward tile spills: 16 or 32 rows on mma.sync
        "fwd": [(64, 32, 8, 2, "T off"), (64, 64, 8, 2, "T off"), (32, 16, 4, 2, "T on"), (16, 32, 4, 2, "T on")],
        "dkdv": _HOPPER_CONFIGS[256]["dkdv"],
        "dq": _HOPPER_CONFIGS[256]["dq"],
    },
}

# gfx942 (MI300X, MFMA, wave64; 64 KiB of LDS): 4 waves a block (one per SIMD) may use 512 registers a lane, but
# only the 256 architectural ones for anything that is not an MFMA operand or accumulator, so the tiles are
# narrower than on NVIDIA and the temperature statistics (a second accumulator) take the narrowest.
_CDNA3_CONFIGS = {
    64: {
        "fwd": [(128, 32, 4, 2), (128, 64, 4, 1, "T off"), (64, 32, 4, 2, "T off")],
        "dkdv": [(32, 64, 4, 2), (32, 32, 4, 2)],
        "dq": [(64, 32, 4, 2, "T off"), (128, 32, 4, 2, "T off"), (128, 16, 4, 2, "T on"), (64, 16, 4, 2, "T on")],
    },
    128: {
        "fwd": [(128, 32, 4, 2, "T off"), (64, 32, 4, 2, "T off"), (128, 16, 4, 2, "T on"), (64, 16, 4, 2, "T on")],
        "dkdv": [(32, 32, 4, 2), (16, 64, 4, 2)],
        "dq": [(128, 32, 4, 2), (64, 32, 4, 2)],
    },
    256: {
        "fwd": [(64, 16, 4, 2), (32, 16, 4, 2)],
        "dkdv": [(16, 32, 4, 2)],
        "dq": [(32, 16, 4, 2)],
    },
}

# gfx950 (MI350X/MI355X, MFMA, 160 KiB of LDS): gfx942's table less the head-dim-64 forward tiles that spill there
# with soft-capping; with the temperature on and soft-capping a 16-key tile serves instead.
_CDNA4_CONFIGS = {
    64: dict(_CDNA3_CONFIGS[64], fwd=[(128, 32, 4, 2, "no softcap"), (128, 64, 4, 1, "T off", "no softcap"),
                                      (64, 32, 4, 2, "T off"), (64, 16, 4, 2, "T on")]),
    128: _CDNA3_CONFIGS[128],
    256: _CDNA3_CONFIGS[256],
}

_FP32_CONFIGS = {
    64: {"fwd": [(32, 32, 8, 1), (32, 16, 4, 1), (64, 32, 8, 1)], "dkdv": [(16, 16, 4, 1), (32, 32, 8, 1)],
         "dq": [(64, 32, 8, 1), (32, 16, 4, 1)]},
    256: {"fwd": [(16, 16, 4, 1)], "dkdv": [(16, 32, 8, 1)], "dq": [(16, 16, 4, 1)]},
}
_FP32_CONFIGS[128] = _FP32_CONFIGS[64]


# The configuration table of each architecture (``kernels/archs.py`` names them); an architecture listed in
# _TABLE_OF runs another's table, one in neither the most conservative table of its vendor (archs.CONSERVATIVE).
_CONFIGS = {"sm_80": _ADA_CONFIGS, "sm_89": _ADA_CONFIGS, "sm_90a": _HOPPER_CONFIGS, "sm_100a": _BLACKWELL_CONFIGS,
            "sm_120": _SM120_CONFIGS, "gfx942": _CDNA3_CONFIGS, "gfx950": _CDNA4_CONFIGS}
_TABLE_OF = {"sm_86": "sm_89"}


def config_table(arch: str) -> str:
    """The name of the configuration table a device of architecture ``arch`` runs: its own, one it shares with
    a screened architecture, or the most conservative screened table of its vendor."""
    if arch in _CONFIGS:
        return arch
    if arch in _TABLE_OF:
        return _TABLE_OF[arch]
    return CONSERVATIVE["hip" if arch.startswith("gfx") else "cuda"]


def _gpu_configs(kind: str, block_d: int, fp32: bool, meta: dict, arch: str) -> list:
    """The autotuner's candidates for kernel ``kind`` on ``arch`` (see ``_HOPPER_CONFIGS`` for the entries' form)
    under the launch flags ``meta``."""
    table = _FP32_CONFIGS if fp32 else _CONFIGS[config_table(arch)]
    entries = table[64 if block_d <= 64 else block_d][kind]
    temp_mode = meta["TEMP_MODE"]
    skip = ({"T on", "T = 2"} if temp_mode == 0 else {"T off"} | ({"T = 2"} if temp_mode == 1 else set()))
    skip |= {"no softcap"} if meta["HAS_SOFTCAP"] else set()
    skip |= set() if meta["CAUSAL"] else {"causal"}
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, **({"ROWS_MAJOR": "rows" in tags} if kind == "dkdv" else {})),
                          num_warps=w, num_stages=s)
            for m, n, w, s, *tags in entries if not skip & set(tags)]


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel,
            "delta": _attn_bwd_delta_kernel}
_TUNERS: dict = {}      # (arch, kind, flags) -> the autotuner over the configurations that compiled and fit
_FAILED: dict = {}      # (arch, kind, flags) -> the KernelCompileError of a launch none of whose configs compiled
_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_PAD", "TEMP_MODE",
             "FAST_MMA"]
# Tuning results persist in Triton's cache directory across processes (triton ≥ 3.2 has the option).
_CACHE_RESULTS = ({"cache_results": True}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})
_DELTA_BLOCK = 32 if _INTERPRET else 64


class Launch(NamedTuple):
    """One kernel launch, as the launchers plan it: kernel ``kind`` on the grid
    ``(programs, cdiv(tiled_len, BLOCK))`` with these arguments and constexpr flags (block sizes excluded:
    they come from the configuration), for the architecture ``arch``. ``bench/compile_report.py`` compiles
    exactly these."""
    kind: str            # "fwd", "dkdv", "dq" (autotuned) or "delta" (one fixed block)
    block_d: int         # padded head dim: selects the configuration table
    tiled_len: int       # the sequence axis the BLOCK tiles (grid axis 1)
    programs: int        # grid axis 0: (cotangent·)batch·heads
    args: tuple
    meta: dict
    arch: str | None     # the target architecture ("sm_90a", "gfx942", …); None under the interpreter

    def configs(self) -> list:
        """The block configurations this launch may run with on a GPU (the autotuner's candidates)."""
        if self.kind == "delta":
            return [triton.Config(dict(BLOCK_M=_DELTA_BLOCK), num_warps=4, num_stages=1)]
        if self.arch is None:
            raise ValueError("Launch.configs: no target architecture (planned under the interpreter)")
        return _gpu_configs(self.kind, self.block_d, not self.meta["FAST_MMA"], self.meta, self.arch)


def config_name(cfg) -> str:
    """``"128x64 w8 s2"``: a configuration as the reports and the errors name it."""
    kw = cfg.kwargs
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N") if k in kw)
    tiling = {True: " rows", False: " keys"}.get(kw.get("ROWS_MAJOR"), "")
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}{tiling}"


def screen_configs(configs: list, compile_config, shared_limit: int) -> tuple[list, list]:
    """``(kept, rejected)``: the configurations that compile (``compile_config(cfg)`` returns the compiled kernel,
    whose ``metadata.shared`` is its shared memory in bytes) and fit ``shared_limit``, and one line per other
    configuration saying why not. Nothing is launched."""
    kept, rejected = [], []
    for cfg in configs:
        try:
            compiled = compile_config(cfg)
        except Exception as err:  # noqa: BLE001 - any compiler failure rejects the configuration, not the process
            lines = [line for line in str(err).strip().splitlines() if line.strip()] or [""]
            rejected.append(f"{config_name(cfg)}: {type(err).__name__}: {lines[-1][:300]}")
            continue
        shared = int(compiled.metadata.shared)
        if shared > shared_limit:
            rejected.append(f"{config_name(cfg)}: needs {shared} B of shared memory, the device has {shared_limit} B")
            continue
        kept.append(cfg)
    return kept, rejected


_SHARED_LIMITS: dict = {}


def _shared_limit(arch: str | None) -> int:
    """Shared memory one block of the current device may use, in bytes: the driver's figure (Triton's driver
    utilities), else the architecture's table value, else no limit."""
    device = torch.cuda.current_device()
    if device not in _SHARED_LIMITS:
        try:
            limit = int(triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"])
        except Exception:  # noqa: BLE001 - an old or unusual driver: fall back to the table
            limit = ARCHS[arch].shared_bytes if arch in ARCHS else 1 << 62
        _SHARED_LIMITS[device] = limit
    return _SHARED_LIMITS[device]


def _ready(launch: Launch, key: tuple) -> list:
    """The configurations of ``launch`` that compile for the current device and fit its shared memory, compiled
    now (the autotuner then finds them in Triton's cache and times only these). Raises
    :class:`KernelCompileError` when none does; the verdict is kept per key, so a failing kernel is compiled once
    per process."""
    if key in _FAILED:
        raise _FAILED[key]
    kernel = _KERNELS[launch.kind]

    def compile_config(cfg):
        return kernel.warmup(*launch.args, grid=(1,), **launch.meta, **cfg.kwargs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)

    kept, rejected = screen_configs(launch.configs(), compile_config, _shared_limit(launch.arch))
    if not kept:
        _FAILED[key] = KernelCompileError(launch.arch, f"attention {launch.kind}", "; ".join(rejected))
        raise _FAILED[key]
    return kept


def _run(launch: Launch) -> None:
    """Run a planned launch: fixed blocks under the interpreter; on a GPU, autotuned over the configurations of
    the device's table that compile and fit its shared memory (one autotuner per architecture, kernel, padded
    head dim, operand type, temperature mode, soft-capping and causality, built on first use; it re-tunes per
    power-of-two sequence-length bucket and feature set, and keeps its results in Triton's cache across
    processes). Raises :class:`KernelCompileError` when the kernel does not compile for the device."""
    kind, tiled_len, programs = launch.kind, launch.tiled_len, launch.programs
    block_name = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if _INTERPRET:
        cfg = dict(BLOCK_M=_DELTA_BLOCK) if kind == "delta" else _INTERPRET_CONFIGS[kind]
        _KERNELS[kind][(programs, triton.cdiv(tiled_len, cfg[block_name]))](*launch.args, **launch.meta, **cfg)
        return
    meta = launch.meta
    key = (launch.arch, kind, launch.block_d, meta.get("FAST_MMA"), meta.get("TEMP_MODE"), meta.get("HAS_SOFTCAP"),
           meta.get("CAUSAL"), meta.get("HAS_WINDOW"), meta.get("HAS_PAD"))
    tuner = _TUNERS.get(key)
    if tuner is None:
        configs = _ready(launch, key)
        if kind == "delta":
            tuner = _KERNELS[kind]
        else:
            tuner = triton.autotune(configs=configs, key=_TUNE_KEY, **_CACHE_RESULTS)(_KERNELS[kind])
        _TUNERS[key] = tuner
    if kind == "delta":
        tuner[(programs, triton.cdiv(tiled_len, _DELTA_BLOCK))](*launch.args, **meta, BLOCK_M=_DELTA_BLOCK,
                                                                num_warps=4, num_stages=1)
        return
    tuner[lambda cfg: (programs, triton.cdiv(tiled_len, cfg[block_name]))](*launch.args, **meta)


def _check_inputs(q: torch.Tensor) -> None:
    if not _INTERPRET and not q.is_cuda:
        raise RuntimeError(
            "gim_fast.kernels.attention: the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, to run them on the CPU)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gim_fast.kernels.attention: float32, float16 or bfloat16 inputs only, got {q.dtype} "
                        "(the kernels compute in float32; use the torch backend for float64)")


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels store O, dQ, dK, dV in. The interpreter's float32 → 16-bit cast truncates (a GPU rounds
    to nearest), which would double the 16-bit errors of the CPU tests: under it, store float32 and let torch
    round. On a GPU: the inputs' dtype, no extra pass."""
    return torch.float32 if _INTERPRET and dtype in (torch.float16, torch.bfloat16) else dtype


def _temperature_mode(temperature) -> int:
    if temperature is None or float(temperature) == 1.0:
        return 0
    return 2 if float(temperature) == 2.0 else 1


def _padding_spans(real: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, 4]`` per sequence, from the key padding mask ``real`` ``[B, S]`` (nonzero = real token):
    (first real key, last real key + 1, and the same two when every key between them is real — left or right
    padding — else (S, 0), an empty span). Computed on the device, no host synchronisation: the kernels skip key
    tiles outside the first span and run the unmasked stage only inside the second."""
    seq_len = real.shape[1]
    real = real != 0
    idx = torch.arange(seq_len, device=real.device, dtype=torch.int32)
    first = torch.where(real, idx, seq_len).amin(1)
    end = torch.where(real, idx + 1, 0).amax(1)
    whole = real.sum(1, dtype=torch.int32) == end - first
    spans = (first, end, torch.where(whole, first, seq_len), torch.where(whole, end, 0))
    return torch.stack(spans, 1).to(torch.int32).contiguous()


def _shared_layout(q: torch.Tensor, g5: torch.Tensor):
    """(q, dO) with dO ``[M, B, Hq, S, D]`` laid out like q within each cotangent, so that the backward kernels
    address both with q's strides (the dK/dV kernel: one set of row offsets for both tiles, fewer registers).
    Usually free: dO arrives in q's layout (both are views of [B, S, Hq, D] buffers under transformers). Else dO
    is copied into q's layout, or, when q is not dense (a slice of a fused projection), both are made
    contiguous."""
    def same(a, b):
        return all(a.stride(d) == b.stride(d) or a.shape[d] == 1 for d in range(4))

    if same(g5[0], q):
        return q, g5
    order = sorted(range(4), key=lambda d: -q.stride(d))          # q's dims, outermost first
    buf = torch.empty((g5.shape[0],) + tuple(q.shape[d] for d in order), dtype=g5.dtype, device=g5.device)
    moved = buf.permute(0, *[1 + order.index(d) for d in range(4)])
    if same(moved[0], q):
        return q, moved.copy_(g5)
    q = q.contiguous()
    return q, g5.contiguous()


class _Common(NamedTuple):
    """What the forward and the backward launches share (from :func:`_common`)."""
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    block_d: int          # head dim padded to a power of two (≥ 16)
    kpm: torch.Tensor     # uint8 [B, S] key padding mask (a 1×1 placeholder without padding: never read)
    kvr: torch.Tensor     # int32 [B, 4] padding spans (a placeholder without padding)
    mode: int             # temperature mode: 0 off, 1 any T, 2 T = 2
    scalars: dict         # runtime scalars: scale, softcap, inv_temp, window, seq_bucket
    meta: dict            # constexpr flags shared by the kernels
    arch: str | None      # target architecture; None under the interpreter


def _plan_arch(q: torch.Tensor, arch: str | None) -> str | None:
    """The architecture a launch is planned for: ``arch`` when given (the compile report plans for any target
    on ``meta`` tensors), else q's device's; None under the interpreter."""
    if arch is not None or _INTERPRET:
        return arch
    return device_arch(q.device) if q.is_cuda else None


def _common(q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature, arch) -> _Common:
    """Launch arguments shared by the kernels: flags, runtime scalars, the padding mask and its spans. (The
    launchers have checked that q is a CUDA tensor unless interpreting, so 16-bit inputs mean tensor-core dots.)"""
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8)
        kvr = _padding_spans(kpm)
    else:   # never read
        kpm = torch.ones(1, 1, dtype=torch.uint8, device=q.device)
        kvr = torch.zeros(1, 4, dtype=torch.int32, device=q.device)
    arch = _plan_arch(q, arch)
    fast_mma = (not _INTERPRET) and q.dtype in (torch.float16, torch.bfloat16)
    mode = _temperature_mode(temperature)
    scalars = dict(
        scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        inv_temp=1.0 / float(temperature) if mode else 1.0,
        window=int(sliding_window) if sliding_window is not None else 0,
        seq_bucket=triton.next_power_of_2(seq_len),
    )
    nvidia = arch is not None and not arch.startswith("gfx")
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_PAD=key_padding_mask is not None, FAST_MMA=fast_mma,
        # 16-bit operands ignore it (NVIDIA keeps Triton's default, tf32; AMD's gfx950 accepts only ieee/bf16xN);
        # fp32 operands stay exact
        DOT_PRECISION="tf32" if fast_mma and nvidia else "ieee",
        PTX=nvidia,                                      # inline PTX (NVIDIA targets only)
        TMEM=nvidia and arch.startswith("sm_10"),        # the sm_100 family: tcgen05, tensor memory
    )
    return _Common(batch, q_heads, kv_heads, seq_len, head_dim, block_d, kpm, kvr, mode, scalars, meta, arch)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

def attention_forward(q, k, v, *, scale, causal, sliding_window=None, softcap=None, key_padding_mask=None,
                      temperature=None, need_backward=True):
    """Fused attention forward. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` (any strides), key_padding_mask bool
    ``[B,S]`` (True = real token) or None. ``temperature`` None or 1.0 = off.

    Returns ``(out, lse, lse_t, o_t)``: out ``[B,Hq,S,D]`` contiguous in q's dtype; lse fp32 ``[B,Hq,S]``
    (natural log, +inf for a row with no allowed key); lse_t fp32 ``[B,Hq,S]`` and o_t = P_T V fp32
    ``[B,Hq,S,D]`` only when ``need_backward`` and the temperature is on, else None.
    """
    _check_inputs(q)
    with _on_device(q):
        (out, lse, lse_t, o_t), launches = forward_plan(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
            key_padding_mask=key_padding_mask, temperature=temperature, need_backward=need_backward)
        for launch in launches:
            _run(launch)
    return out.to(q.dtype), lse, lse_t, o_t


def forward_plan(q, k, v, *, scale, causal, sliding_window=None, softcap=None, key_padding_mask=None,
                 temperature=None, need_backward=True, arch=None):
    """The outputs :func:`attention_forward` will fill (allocated, not yet written; ``out`` possibly in float32
    under the interpreter) and the list of :class:`Launch` that fill them. Works on ``meta`` tensors too, for any
    target ``arch`` (default: q's device's)."""
    c = _common(q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature, arch)
    batch, q_heads, kv_heads, seq_len, head_dim, s = c.batch, c.q_heads, c.kv_heads, c.seq_len, c.head_dim, c.scalars
    mode = c.mode if need_backward else 0      # the forward value does not depend on T
    out = torch.empty(batch, q_heads, seq_len, head_dim, dtype=_store_dtype(q.dtype), device=q.device)
    lse = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    if mode:
        lse_t = torch.empty_like(lse)
        o_t = torch.empty(batch, q_heads, seq_len, head_dim, dtype=torch.float32, device=q.device)
    else:
        lse_t, o_t = None, None
    if out.numel() == 0:
        return (out, lse, lse_t, o_t), []
    args = (q, k, v, c.kpm, c.kvr, out, lse, lse if lse_t is None else lse_t, out if o_t is None else o_t,
            *q.stride(), *k.stride(), *v.stride(), *c.kpm.stride(),
            q_heads, q_heads // kv_heads, seq_len,
            s["scale"], s["softcap"], s["inv_temp"] if mode else 1.0, s["window"], s["seq_bucket"])
    launch = Launch("fwd", c.block_d, seq_len, batch * q_heads, args, dict(c.meta, TEMP_MODE=mode), c.arch)
    return (out, lse, lse_t, o_t), [launch]


def attention_backward(grad_out, q, k, v, out, lse, lse_t=None, o_t=None, *, scale, causal, sliding_window=None,
                       softcap=None, key_padding_mask=None, temperature=None, q_scale=None, k_scale=None,
                       v_scale=None):
    """GIM backward of :func:`attention_forward`: ``(dq, dk, dv)``, in the inputs' dtypes.

    ``out, lse, lse_t, o_t`` are what the forward returned (lse_t/o_t needed when the temperature is on).
    dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T)), dV = Pᵀ dO with the true P; dq, dk, dv times q_scale, k_scale, v_scale
    (None = 1).

    ``grad_out`` is ``[B,Hq,S,D]`` (one cotangent: dq ``[B,Hq,S,D]``, dk/dv ``[B,Hkv,S,D]``) or a stack of M
    cotangents ``[M,B,Hq,S,D]`` against the same forward: then dq is ``[M,B,Hq,S,D]`` and dk/dv ``[M,B,Hkv,S,D]``,
    entry m the gradients for cotangent m (the backward is linear in dO). q, k, v, out, lse, lse_t and o_t are
    shared by the M cotangents — indexed, never copied; only Δ_T (an fp32 ``[M,B,Hq,S]``) is per cotangent. The
    kernels run once over a grid M times larger, so the M backward passes share their launches and their
    programs fill the GPU together.
    """
    _check_inputs(q)
    with _on_device(q):
        (dq, dk, dv), launches = backward_plan(
            grad_out, q, k, v, out, lse, lse_t, o_t, scale=scale, causal=causal, sliding_window=sliding_window,
            softcap=softcap, key_padding_mask=key_padding_mask, temperature=temperature, q_scale=q_scale,
            k_scale=k_scale, v_scale=v_scale)
        for launch in launches:
            _run(launch)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def backward_plan(grad_out, q, k, v, out, lse, lse_t=None, o_t=None, *, scale, causal, sliding_window=None,
                  softcap=None, key_padding_mask=None, temperature=None, q_scale=None, k_scale=None, v_scale=None,
                  arch=None):
    """``(dq, dk, dv)`` as :func:`attention_backward` will fill them, and the :class:`Launch` list (Δ_T, dK/dV,
    dQ) that fills them. Works on ``meta`` tensors too, for any target ``arch`` (default: q's device's)."""
    c = _common(q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature, arch)
    batch, q_heads, kv_heads, seq_len, head_dim = c.batch, c.q_heads, c.kv_heads, c.seq_len, c.head_dim
    block_d, kpm, kvr, mode, s, meta, arch = c.block_d, c.kpm, c.kvr, c.mode, c.scalars, c.meta, c.arch
    if mode and (lse_t is None or o_t is None):
        raise ValueError("attention_backward: the temperature is on but the forward saved no lse_t/o_t "
                         "(call attention_forward with need_backward=True)")
    stacked = grad_out.dim() == 5
    g5 = grad_out if stacked else grad_out.unsqueeze(0)
    if g5.dim() != 5 or tuple(g5.shape[1:]) != tuple(q.shape):
        raise ValueError(f"attention_backward: grad_out must be [B,Hq,S,D] = {list(q.shape)} or [M,B,Hq,S,D] "
                         f"(a stack of M cotangents), got {list(grad_out.shape)}")
    n_cot = g5.shape[0]
    lead = (n_cot,) if stacked else ()
    dq = torch.empty(*lead, batch, q_heads, seq_len, head_dim, dtype=_store_dtype(q.dtype), device=q.device)
    dk = torch.empty(*lead, batch, kv_heads, seq_len, head_dim, dtype=_store_dtype(k.dtype), device=q.device)
    dv = torch.empty(*lead, batch, kv_heads, seq_len, head_dim, dtype=_store_dtype(v.dtype), device=q.device)
    if dq.numel() == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_()), []
    group = q_heads // kv_heads
    o_src = o_t if mode else out
    q, g5 = _shared_layout(q, g5.to(q.device))

    delta = torch.empty(n_cot, batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    launches = [Launch("delta", block_d, seq_len, n_cot * batch * q_heads,
                       (o_src, g5, delta, *o_src.stride(), g5.stride(0), *q.stride(), q_heads, batch * q_heads,
                        seq_len),
                       dict(HEAD_DIM=head_dim, BLOCK_D=block_d), arch)]
    meta = dict(meta, TEMP_MODE=mode)
    strides = (*q.stride(), *k.stride(), *v.stride(), g5.stride(0), *kpm.stride())
    runtime = (s["scale"], s["softcap"], s["inv_temp"], s["window"])
    lse_t_arg = lse_t if mode else lse
    # T = 2: P = P_T²·R with R = exp(2·LSE_T − LSE) ∈ [1, #keys] per row (0 for a row with no key), computed once
    # here so that the dK/dV kernel spends one exp per score and no per-row work in its loop.
    p_stat = torch.where(torch.isinf(lse), 0.0, torch.exp(2.0 * lse_t - lse)) if mode == 2 else lse
    launches.append(Launch(
        "dkdv", block_d, seq_len, n_cot * batch * kv_heads,
        (q, k, v, g5, kpm, kvr, p_stat, lse_t_arg, delta, dk, dv, *strides, kv_heads, batch * kv_heads, seq_len,
         *runtime, s["scale"] * (1.0 if k_scale is None else float(k_scale)),
         1.0 if v_scale is None else float(v_scale), s["seq_bucket"]),
        dict(meta, GROUP=group), arch))
    launches.append(Launch(
        "dq", block_d, seq_len, n_cot * batch * q_heads,
        (q, k, v, g5, kpm, kvr, lse_t_arg, delta, dq, *strides, q_heads, batch * q_heads, group, seq_len,
         *runtime, s["scale"] * (1.0 if q_scale is None else float(q_scale)), s["seq_bucket"]),
        meta, arch))
    return (dq, dk, dv), launches
