"""Fused GIM attention: a FlashAttention-2 style forward and a GIM backward, in Triton.

Shapes: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` with ``G = Hq / Hkv`` query heads per KV head (GQA/MQA by
indexing, ``kv_head = q_head // G``; K and V are never repeated). Any strides, any S, D up to 256.

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

All exponentials run in the exp2 domain: the kernels carry S·log2(e). LSE and LSE_T are stored in natural-log
units (comparable with the torch backend); the kernels convert with one multiply per row.

Kernels (no float atomics anywhere, so gradients are bit-identical run to run):
    _attn_fwd_kernel        grid (query blocks, B·Hq)
    _attn_bwd_delta_kernel  grid (query blocks, B·Hq): Δ_T = rowsum(dO ⊙ O_T)
    _attn_bwd_dkdv_kernel   grid (key blocks,   B·Hkv): loops over the G query heads of its group and over the
                            query blocks that can see its keys, so dK/dV of a KV head are reduced in registers,
                            in a fixed order, by one program
    _attn_bwd_dq_kernel     grid (query blocks, B·Hq): loops over the key blocks its queries can see

Interpreter notes (TRITON_INTERPRET=1, how the CPU tests run): every load is upcast to float32 at once (bf16
loads/dots give garbage there), dots are float32 "ieee", one fixed block configuration (autotune needs a GPU),
tanh is written with exp2, and O/dQ/dK/dV are stored in float32 and rounded by torch (the interpreter's
float32 → bf16 cast truncates). On a GPU with fp16/bf16 inputs (``FAST_MMA``) the dot operands stay 16-bit
(P and dS are cast to the input dtype before their dots) and the accumulators stay float32; fp32 inputs use
exact ("ieee") dots, not TF32. The GPU path has been compiled for sm_90a (every feature combination and block
configuration below) but not yet run on a GPU.

Why Δ_T from O_T, accumulated in the forward pass, rather than a first backward pass over the keys: the extra
forward work is one [BLOCK_M, BLOCK_N] × [BLOCK_N, D] matmul per tile (P_T V; the exp for P_T is needed anyway
for LSE_T), and Δ_T then costs one cheap elementwise kernel reading O_T. A separate backward pass would recompute
both Q Kᵀ and dO Vᵀ per tile (two matmuls and an exp): twice the extra matmul work. The price is one fp32
[B, Hq, S, D] buffer per layer (fp32 so that Δ_T, whose error enters every dS, is not rounded to 16 bits),
paid only when a backward follows and the temperature is on. (FLOP argument; not yet timed on a GPU.)
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["attention_forward", "attention_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): exp(x) = exp2(x·log2 e)


# ----------------------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    """tanh(x) = sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|) ∈ (0, 1]: no overflow for any x, no tl tanh needed."""
    e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores_log2(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(S·log2 e, tanh) from raw q·k: S = cap·tanh(scale·qk/cap), or scale·qk. The tanh (returned for the
    soft-cap derivative 1 − tanh²) is a placeholder equal to qk when soft-capping is off."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        return t * (softcap * _LOG2E), t
    else:
        return qk * (scale * _LOG2E), qk


@triton.jit
def _allowed(i, j, seq_len, key_ok, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_PAD: tl.constexpr):
    """True where query i may attend to key j; i, j (and key_ok, the padding mask of the keys, shaped like j)
    broadcast against each other: [M,1]×[1,N] in the row-major kernels, [1,M]×[N,1] in the dK/dV kernel."""
    ok = (i < seq_len) & (j < seq_len)
    if CAUSAL:
        ok = ok & (j <= i)
    if HAS_WINDOW:
        ok = ok & (j > i - window)
    if HAS_PAD:
        ok = ok & (key_ok != 0)
    return ok


@triton.jit
def _key_block_scores(q, k_base, v_base, m_base, offs_m, offs_n, offs_d, d_ok, stride_ks, stride_kd, stride_vs,
                      stride_vd, stride_ms, seq_len, scale, softcap, window, CAUSAL: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
                      FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For the row-major kernels (forward, dQ): load the key block ``offs_n`` of K and V (and its padding
    mask) and return (k, v, S·log2 e masked to −inf where query ``offs_m`` may not attend, the soft-cap tanh)."""
    col_ok = offs_n < seq_len
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if not FAST_MMA:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_PAD:
        key_ok = tl.load(m_base + offs_n * stride_ms, mask=col_ok, other=0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s2, tanh = _scores_log2(qk, scale, softcap, HAS_SOFTCAP)
    ok = _allowed(offs_m[:, None], offs_n[None, :], seq_len, key_ok[None, :], window, CAUSAL, HAS_WINDOW, HAS_PAD)
    return k, v, tl.where(ok, s2, float("-inf")), tanh


@triton.jit
def _key_range(start_m, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key columns [lo, hi) that query rows [start_m, start_m + BLOCK_M) can see; lo aligned to BLOCK_N.
    Key blocks outside the causal triangle or the sliding window are never visited."""
    lo = 0
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query rows [lo, hi) that can see key columns [start_n, start_n + BLOCK_N); lo aligned to BLOCK_M.
    Causal: i >= j, so i >= start_n. Window: i < j + w, so i < start_n + BLOCK_N − 1 + w."""
    lo = 0
    hi = seq_len
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(seq_len, start_n + BLOCK_N + window - 1)
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides, any float dtype
    KPM,                 # uint8 [B,S] key padding mask, nonzero = real token (read only when HAS_PAD)
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
):
    """Online softmax over key blocks, one program per (query block, batch·query head).

    m = running max of S·log2e (shared by S and S/T: max(S/T) = max(S)/T), l = Σ exp2(S·log2e − m),
    acc = Σ exp2(S·log2e − m)·V, rescaled by exp2(m_old − m_new) when the max moves. O = acc / l,
    LSE = (m + log2 l)·ln 2. With the temperature: l_T = Σ exp2((S·log2e − m)/T), acc_T likewise,
    O_T = acc_T / l_T, LSE_T = (m/T + log2 l_T)·ln 2. For T = 2, u = exp2((S·log2e − m)/2) gives P_T ∝ u, P ∝ u².
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    m_base = KPM + b.to(tl.int64) * stride_mb

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if not FAST_MMA:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TEMP_MODE != 0:
        l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, s2, _ = _key_block_scores(
            q, k_base, v_base, m_base, offs_m, start_n + offs_n0, offs_d, d_ok, stride_ks, stride_kd, stride_vs,
            stride_vd, stride_ms, seq_len, scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD,
            FAST_MMA, DOT_PRECISION)

        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row that has seen no allowed key yet keeps m = −inf; subtract 0 instead so that exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if TEMP_MODE == 2:
            u = tl.exp2((s2 - m_use[:, None]) * 0.5)
            alpha_t = tl.exp2((m_i - m_use) * 0.5)
            p = u * u
            alpha = alpha_t * alpha_t
        else:
            p = tl.exp2(s2 - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if TEMP_MODE == 1:
            u = tl.exp2((s2 - m_use[:, None]) * inv_temp)
            alpha_t = tl.exp2((m_i - m_use) * inv_temp)
        if TEMP_MODE != 0:
            l_t = l_t * alpha_t + tl.sum(u, 1)
            acc_t = tl.dot(u.to(v.dtype), v, acc_t * alpha_t[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0          # no allowed key: output 0, LSE = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_off = pid_bh.to(tl.int64) * seq_len + offs_m          # row index into the contiguous [B,Hq,S] layout
    o_ptrs = row_off[:, None] * HEAD_DIM + offs_d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(O + o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * (1.0 / _LOG2E))
    tl.store(LSE + row_off, lse, mask=row_ok)
    if TEMP_MODE != 0:
        lt_safe = tl.where(empty, 1.0, l_t)
        if TEMP_MODE == 2:
            lse_t = (m_i * 0.5 + tl.log2(lt_safe)) * (1.0 / _LOG2E)
        else:
            lse_t = (m_i * inv_temp + tl.log2(lt_safe)) * (1.0 / _LOG2E)
        tl.store(LSE_T + row_off, tl.where(empty, float("inf"), lse_t), mask=row_ok)
        tl.store(O_T + o_ptrs, acc_t / lt_safe[:, None], mask=o_mask)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta_kernel(
    OT,                  # O_T = P_T V [B,Hq,S,D] (O itself when the temperature is off); any strides
    DO,                  # grad of the output [B,Hq,S,D]; any strides
    DELTA,               # out: fp32 [B,Hq,S] contiguous
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    n_q_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ_T[i] = Σ_d dO[i,d]·O_T[i,d]  (= rowsum(dP ⊙ P_T), the flash-attention "Delta" with P_T)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    ot = tl.load(OT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                 + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                 + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(ot * do, 1), mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides
    DO,                  # grad of the output [B,Hq,S,D]; any strides
    KPM,                 # uint8 [B,S] key padding mask (read only when HAS_PAD)
    LSE,                 # fp32 [B,Hq,S] contiguous, natural-log LSE of S
    LSE_T,               # fp32 [B,Hq,S] contiguous, LSE of S/T (read only when TEMP_MODE != 0)
    DELTA,               # fp32 [B,Hq,S] contiguous, Δ_T
    DK, DV,              # out: [B,Hkv,S,D] contiguous, k's dtype
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_mb, stride_ms,
    n_kv_heads, group, seq_len,
    scale, softcap, inv_temp, window,
    dk_factor,           # scale · k_scale (dS is taken w.r.t. the scaled scores)
    dv_factor,           # v_scale
    seq_bucket,          # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
    TEMP_MODE: tl.constexpr, FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one KV head, one program per (key block, batch·KV head).

    Works on transposed tiles (keys along rows): Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·log2e − LSE·log2e),
    P_Tᵀ = exp2(Sᵀ·log2e/T − LSE_T·log2e), dPᵀ = V dOᵀ, dSᵀ = P_Tᵀ ⊙ (dPᵀ − Δ_T) (⊙ (1 − tanh²)),
    dV += Pᵀ dO, dK += dSᵀ Q, summed over the G query heads of the group and the query blocks that can see these
    keys, in that fixed order, in registers: the GQA reduction needs no atomics and is deterministic.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hkv = pid_bh % n_kv_heads
    start_n = pid_n * BLOCK_N
    n_q_heads = n_kv_heads * group

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < seq_len
    kv_mask = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if not FAST_MMA:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_PAD:
        key_ok = tl.load(KPM + b.to(tl.int64) * stride_mb + offs_n * stride_ms, mask=col_ok, other=0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(group):
        h = hkv * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        row_base = (b * n_q_heads + h).to(tl.int64) * seq_len      # into the contiguous [B,Hq,S] statistics
        for start_m in tl.range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seq_len
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=qd_mask, other=0.0)
            if not FAST_MMA:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Rows past the end get LSE = +inf, hence P = 0, like rows with no allowed key.
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)

            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)          # [BLOCK_N, BLOCK_M]
            s2_t, tanh_t = _scores_log2(qk_t, scale, softcap, HAS_SOFTCAP)
            ok = _allowed(offs_m[None, :], offs_n[:, None], seq_len, key_ok[:, None], window,
                          CAUSAL, HAS_WINDOW, HAS_PAD)
            s2_t = tl.where(ok, s2_t, float("-inf"))
            if TEMP_MODE == 0:
                p_t = tl.exp2(s2_t - lse2[None, :])
                pt_t = p_t
            else:
                lset2 = tl.load(LSE_T + row_base + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
                if TEMP_MODE == 2:
                    # P = P_T² · exp2(2·LSE_T − LSE) (log2 units): one exp per element instead of two.
                    pt_t = tl.exp2(s2_t * 0.5 - lset2[None, :])
                    empty = lse2 == float("inf")        # then P_T = 0 already; keep c finite (no inf − inf)
                    c = tl.exp2(tl.where(empty, 0.0, lset2) * 2.0 - tl.where(empty, 0.0, lse2))
                    c = tl.where(empty, 0.0, c)
                    p_t = pt_t * pt_t * c[None, :]
                else:
                    pt_t = tl.exp2(s2_t * inv_temp - lset2[None, :])
                    p_t = tl.exp2(s2_t - lse2[None, :])

            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)    # dV += Pᵀ dO (true P)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)          # dPᵀ = V dOᵀ
            ds_t = pt_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - tanh_t * tanh_t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)    # dK += dSᵀ Q

    out_off = pid_bh.to(tl.int64) * seq_len * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * dk_factor).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, (dv * dv_factor).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,             # q [B,Hq,S,D]; k, v [B,Hkv,S,D]; any strides
    DO,                  # grad of the output [B,Hq,S,D]; any strides
    KPM,                 # uint8 [B,S] key padding mask (read only when HAS_PAD)
    LSE_T,               # fp32 [B,Hq,S] contiguous: LSE of S/T (LSE itself when the temperature is off)
    DELTA,               # fp32 [B,Hq,S] contiguous, Δ_T
    DQ,                  # out: [B,Hq,S,D] contiguous, q's dtype
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_mb, stride_ms,
    n_q_heads, group, seq_len,
    scale, softcap, inv_temp, window,
    dq_factor,           # scale · q_scale
    seq_bucket,          # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr,
    TEMP_MODE: tl.constexpr, FAST_MMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block, one program per (query block, batch·query head).

    P_T = exp2(S·log2e·(1/T) − LSE_T·log2e) (only P_T is needed here), dP = dO Vᵀ, dS = P_T ⊙ (dP − Δ_T)
    (⊙ (1 − tanh²)), dQ = Σ over the visible key blocks of dS K, times scale·q_scale at the store.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hkv = h // group
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    qd_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                 + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=qd_mask, other=0.0)
    if not FAST_MMA:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_off = pid_bh.to(tl.int64) * seq_len + offs_m
    lset2 = tl.load(LSE_T + row_off, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    m_base = KPM + b.to(tl.int64) * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, s2, tanh = _key_block_scores(
            q, k_base, v_base, m_base, offs_m, start_n + offs_n0, offs_d, d_ok, stride_ks, stride_kd, stride_vs,
            stride_vd, stride_ms, seq_len, scale, softcap, window, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD,
            FAST_MMA, DOT_PRECISION)
        if TEMP_MODE == 0:
            pt = tl.exp2(s2 - lset2[:, None])
        elif TEMP_MODE == 2:
            pt = tl.exp2(s2 * 0.5 - lset2[:, None])
        else:
            pt = tl.exp2(s2 * inv_temp - lset2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = pt * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + row_off[:, None] * HEAD_DIM + offs_d[None, :], (dq * dq_factor).to(DQ.dtype.element_ty),
             mask=qd_mask)


# ----------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------

# Under the interpreter: one fixed configuration, small and with BLOCK_M != BLOCK_N so that the CPU tests cross
# block boundaries and unaligned window/causal ranges.
_INTERPRET_CONFIGS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
}


def _gpu_configs(kind: str, block_d: int, fp32: bool):
    """Hopper candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, padded head dim and operand type.

    Screened without a GPU: compiled for sm_90a and kept where ptxas reports no (or few) register spills with
    every feature on; the autotuner picks among them on the device. fp32 operands go through "ieee" dots
    (FMA, no tensor cores: a correctness path, not a fast one) and need small tiles.
    """
    if fp32:
        table = {
            "fwd": [(32, 32, 8, 1), (32, 16, 4, 1), (64, 32, 8, 1)],
            "dkdv": [(16, 16, 4, 1), (32, 32, 8, 1)],
            "dq": [(64, 32, 8, 1), (32, 16, 4, 1)],
        } if block_d <= 128 else {
            "fwd": [(16, 16, 4, 1)],
            "dkdv": [(16, 32, 8, 1)],
            "dq": [(16, 16, 4, 1)],
        }
    elif block_d <= 128:
        table = {
            "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
            "dkdv": [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
            "dq": [(128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
        }
    else:   # head dim 256: two fp32 [BLOCK, 256] accumulators per program, so smaller tiles / more warps
        table = {
            "fwd": [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
            "dkdv": [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
            "dq": [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
        }
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in table[kind]]


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel,
            "delta": _attn_bwd_delta_kernel}
_TUNERS: dict = {}
_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_PAD", "TEMP_MODE", "FAST_MMA"]
_DELTA_BLOCK = 32 if _INTERPRET else 64


class Launch(NamedTuple):
    """One kernel launch, as the launchers plan it: kernel ``kind`` on the grid
    ``(cdiv(tiled_len, BLOCK), programs)`` with these arguments and constexpr flags (block sizes excluded:
    they come from the configuration). ``bench/compile_report.py`` compiles exactly these for sm_90a."""
    kind: str            # "fwd", "dkdv", "dq" (autotuned) or "delta" (one fixed block)
    block_d: int         # padded head dim: selects the configuration table
    tiled_len: int       # the sequence axis the BLOCK tiles
    programs: int        # the other grid axis
    args: tuple
    meta: dict

    def configs(self) -> list:
        """The block configurations this launch may run with on a GPU (the autotuner's candidates)."""
        if self.kind == "delta":
            return [triton.Config(dict(BLOCK_M=_DELTA_BLOCK), num_warps=4, num_stages=1)]
        return _gpu_configs(self.kind, self.block_d, not self.meta["FAST_MMA"])


def _run(launch: Launch) -> None:
    """Run a planned launch: fixed blocks under the interpreter, autotuned on a GPU (one autotuner per kernel,
    padded head dim and operand type, built on first use; it re-tunes per power-of-two sequence-length bucket
    and feature set)."""
    kind, tiled_len, programs = launch.kind, launch.tiled_len, launch.programs
    block_name = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if kind == "delta":
        _KERNELS[kind][(triton.cdiv(tiled_len, _DELTA_BLOCK), programs)](
            *launch.args, **launch.meta, BLOCK_M=_DELTA_BLOCK)
        return
    if _INTERPRET:
        cfg = _INTERPRET_CONFIGS[kind]
        _KERNELS[kind][(triton.cdiv(tiled_len, cfg[block_name]), programs)](*launch.args, **launch.meta, **cfg)
        return
    fp32 = not launch.meta["FAST_MMA"]
    tuner = _TUNERS.get((kind, launch.block_d, fp32))
    if tuner is None:
        tuner = triton.autotune(configs=launch.configs(), key=_TUNE_KEY)(_KERNELS[kind])
        _TUNERS[(kind, launch.block_d, fp32)] = tuner
    tuner[lambda cfg: (triton.cdiv(tiled_len, cfg[block_name]), programs)](*launch.args, **launch.meta)


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


def _common(q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature):
    """Launch arguments shared by the kernels: flags, runtime scalars and the padding mask. (The launchers have
    checked that q is a CUDA tensor unless interpreting, so 16-bit inputs mean tensor-core dots.)"""
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8)
    else:
        kpm = torch.ones(1, 1, dtype=torch.uint8, device=q.device)   # never read
    fast_mma = (not _INTERPRET) and q.dtype in (torch.float16, torch.bfloat16)
    mode = _temperature_mode(temperature)
    scalars = dict(
        scale=float(scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        inv_temp=1.0 / float(temperature) if mode else 1.0,
        window=int(sliding_window) if sliding_window is not None else 0,
        seq_bucket=triton.next_power_of_2(seq_len),
    )
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        CAUSAL=bool(causal), HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_PAD=key_padding_mask is not None, FAST_MMA=fast_mma,
        DOT_PRECISION="tf32" if fast_mma else "ieee",   # 16-bit operands ignore it; fp32 operands stay exact
    )
    return batch, q_heads, kv_heads, seq_len, head_dim, block_d, kpm, mode, scalars, meta


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
                 temperature=None, need_backward=True):
    """The outputs :func:`attention_forward` will fill (allocated, not yet written; ``out`` possibly in float32
    under the interpreter) and the list of :class:`Launch` that fill them. Works on ``meta`` tensors too."""
    batch, q_heads, kv_heads, seq_len, head_dim, block_d, kpm, mode, s, meta = _common(
        q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature)
    mode = mode if need_backward else 0      # the forward value does not depend on T
    out = torch.empty(batch, q_heads, seq_len, head_dim, dtype=_store_dtype(q.dtype), device=q.device)
    lse = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    if mode:
        lse_t = torch.empty_like(lse)
        o_t = torch.empty(batch, q_heads, seq_len, head_dim, dtype=torch.float32, device=q.device)
    else:
        lse_t, o_t = None, None
    if out.numel() == 0:
        return (out, lse, lse_t, o_t), []
    args = (q, k, v, kpm, out, lse, lse if lse_t is None else lse_t, out if o_t is None else o_t,
            *q.stride(), *k.stride(), *v.stride(), *kpm.stride(),
            q_heads, q_heads // kv_heads, seq_len,
            s["scale"], s["softcap"], s["inv_temp"], s["window"], s["seq_bucket"])
    return (out, lse, lse_t, o_t), [Launch("fwd", block_d, seq_len, batch * q_heads, args, dict(meta, TEMP_MODE=mode))]


def attention_backward(grad_out, q, k, v, out, lse, lse_t=None, o_t=None, *, scale, causal, sliding_window=None,
                       softcap=None, key_padding_mask=None, temperature=None, q_scale=None, k_scale=None,
                       v_scale=None):
    """GIM backward of :func:`attention_forward`: ``(dq, dk, dv)`` in the inputs' dtypes and shapes.

    ``out, lse, lse_t, o_t`` are what the forward returned (lse_t/o_t needed when the temperature is on).
    dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T)), dV = Pᵀ dO with the true P; dq, dk, dv times q_scale, k_scale, v_scale
    (None = 1).
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
                  softcap=None, key_padding_mask=None, temperature=None, q_scale=None, k_scale=None, v_scale=None):
    """``(dq, dk, dv)`` as :func:`attention_backward` will fill them, and the :class:`Launch` list (Δ_T, dK/dV,
    dQ) that fills them. Works on ``meta`` tensors too."""
    batch, q_heads, kv_heads, seq_len, head_dim, block_d, kpm, mode, s, meta = _common(
        q, k, key_padding_mask, scale, causal, sliding_window, softcap, temperature)
    if mode and (lse_t is None or o_t is None):
        raise ValueError("attention_backward: the temperature is on but the forward saved no lse_t/o_t "
                         "(call attention_forward with need_backward=True)")
    dq = torch.empty(batch, q_heads, seq_len, head_dim, dtype=_store_dtype(q.dtype), device=q.device)
    dk = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=_store_dtype(k.dtype), device=q.device)
    dv = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=_store_dtype(v.dtype), device=q.device)
    if dq.numel() == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_()), []
    group = q_heads // kv_heads
    o_src = o_t if mode else out
    if grad_out.device != q.device:
        grad_out = grad_out.to(q.device)

    delta = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    launches = [Launch("delta", block_d, seq_len, batch * q_heads,
                       (o_src, grad_out, delta, *o_src.stride(), *grad_out.stride(), q_heads, seq_len),
                       dict(HEAD_DIM=head_dim, BLOCK_D=block_d))]
    meta = dict(meta, TEMP_MODE=mode)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *kpm.stride())
    runtime = (s["scale"], s["softcap"], s["inv_temp"], s["window"])
    lse_t_arg = lse_t if mode else lse
    launches.append(Launch(
        "dkdv", block_d, seq_len, batch * kv_heads,
        (q, k, v, grad_out, kpm, lse, lse_t_arg, delta, dk, dv, *strides, kv_heads, group, seq_len, *runtime,
         s["scale"] * (1.0 if k_scale is None else float(k_scale)),
         1.0 if v_scale is None else float(v_scale), s["seq_bucket"]),
        meta))
    launches.append(Launch(
        "dq", block_d, seq_len, batch * q_heads,
        (q, k, v, grad_out, kpm, lse_t_arg, delta, dq, *strides, q_heads, group, seq_len, *runtime,
         s["scale"] * (1.0 if q_scale is None else float(q_scale)), s["seq_bucket"]),
        meta))
    return (dq, dk, dv), launches
