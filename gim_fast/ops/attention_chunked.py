"""The ``torch`` backend of ``gim_attention``: row-chunked, O(S·chunk) memory, any device.

Fast path — when nothing but causality constrains the keys (no padding, window or soft-capping; float16/32):
torch's fused ``scaled_dot_product_attention`` (flash on CPU and GPU, GQA without repeating K/V) does all the
work. The forward is SDPA; the backward uses that the GIM rule for the scores is T × the gradient of
softmax(S/T), and that dP = dO Vᵀ does not depend on the softmax:

    dQ, dK = T · ∂/∂(Q, K) of SDPA(Q, K, V, scale/T)      (its dS is P_T ⊙ (dP − rowsum(dP ⊙ P_T)) exactly)
    dV     = ∂/∂V of SDPA(Q, K, V, scale)                 (Pᵀ dO with the true P)

Chunked path — otherwise: query rows are processed ``chunk_size`` at a time against the key columns they may
see. Nothing but q, k, v is saved: each backward tile spans *all* keys its rows may see, so it recomputes its
rows' softmax exactly from the scores, the way flash attention recomputes P — no S×S matrix, no statistics.

Per tile of query rows, with S the scores exactly as the softmax sees them (scaled, soft-capped, masked):

    P   = softmax(S),    P_T = softmax(S/T),    dP = dO Vᵀ
    dS  = P_T ⊙ (dP − rowsum(dP ⊙ P_T))        (GIM; T = None gives P_T = P, plain attention)
    dS_raw = dS ⊙ (1 − tanh²(S_raw / cap))     (soft-capping)
    dQ = scale·dS_raw K,  dK = scale·dS_rawᵀ Q,  dV = Pᵀ dO     (then × q/k/v scale; dV with the true P)

For T = 2 one exponential serves both: with u = exp((S − max S)/2), P_T = u/Σu and P = u²/Σu².
Causal tiles stop at the tile's last row, so about half the S×S work is skipped. GQA: the ``G = Hq/Hkv`` query
heads sharing a KV head are stacked as ``G·chunk`` rows against that one KV head, so K and V are never repeated
and dK, dV sum over the group inside the matmul. A query row with no allowed key outputs 0 and passes no
gradient. The loops are sequential: results are deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_eager import compute_dtype
from .cotangents import backward_op, unbatched_forward_only
from .masks import allowed_tile, key_range

# Elements of one score tile (B·Hq·rows·keys) the automatic chunk size aims for: 2^22 (16 MB in float32); the
# backward holds about six such tiles at once. At most _MAX_ROWS rows, so that causal tiles skip their upper
# triangle.
_TILE_ELEMENTS = 1 << 22
_MAX_ROWS = 256


def auto_chunk_size(batch: int, q_heads: int, seq_len: int, sliding_window: int | None) -> int:
    """Query rows per chunk: one score tile of about ``_TILE_ELEMENTS`` elements, at most ``_MAX_ROWS`` rows."""
    keys = seq_len if sliding_window is None else min(seq_len, sliding_window + _MAX_ROWS)
    rows = _TILE_ELEMENTS // max(1, batch * q_heads * keys)
    return int(max(16, min(seq_len, _MAX_ROWS, rows)))


def _tile(q, k, v, q_start, q_end, ct, group, scale, softcap, causal, sliding_window, key_padding_mask):
    """One tile: the masked scores ``[B, Hkv, G·c, n]``, the soft-cap tanh (or None), the key range, the
    query tile ``[B, Hkv, G·c, D]`` and the key/value tiles ``[B, Hkv, n, D]``."""
    batch, kv_heads, seq_len, head_dim = k.shape
    c = q_end - q_start
    lo, hi = key_range(q_start, q_end, seq_len, causal, sliding_window)
    q_tile = q[:, :, q_start:q_end].to(ct).reshape(batch, kv_heads, group * c, head_dim)
    k_tile, v_tile = k[:, :, lo:hi].to(ct), v[:, :, lo:hi].to(ct)
    scores = torch.matmul(q_tile, k_tile.transpose(-1, -2)).mul_(scale)
    tanh = None
    if softcap is not None:
        tanh = scores.div_(softcap).tanh_()
        scores = tanh * softcap
    if causal or sliding_window is not None or key_padding_mask is not None:
        allowed = allowed_tile(q_start, q_end, lo, hi, causal=causal, sliding_window=sliding_window,
                               key_padding_mask=key_padding_mask, device=q.device)
        n = hi - lo
        scores.view(batch, kv_heads, group, c, n).masked_fill_(~allowed[:, :, None], float("-inf"))
    return scores, tanh, (lo, hi), q_tile, k_tile, v_tile


def _softmaxes(scores, temperature):
    """(P, P_T) of a tile whose rows hold every key they may see; rows with no allowed key give zeros."""
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    if temperature == 2.0:
        u = (scores - top).mul_(0.5).exp_()
        probs = u * u
        probs_t = u.div_(u.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(u.dtype).tiny))
        probs.div_(probs.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(u.dtype).tiny))
        return probs, probs_t
    shifted = scores - top
    probs = shifted.exp()
    probs.div_(probs.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(probs.dtype).tiny))
    if temperature == 1.0:
        return probs, probs
    probs_t = shifted.div_(temperature).exp_()
    probs_t.div_(probs_t.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(probs_t.dtype).tiny))
    return probs, probs_t


def _use_sdpa(causal, sliding_window, softcap, key_padding_mask, dtype):
    """The fast path: structure torch's SDPA expresses without a dense mask; float64 stays on the chunked path
    (the float64 reference computations of the tests)."""
    return sliding_window is None and softcap is None and key_padding_mask is None and dtype != torch.float64


def _sdpa_backward(q, k, v, grad_out, scale, causal, temperature):
    """(dQ, dK, dV) of GIM attention from torch's fused SDPA backward (the fast path of the module docstring)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def sdpa(s):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=s, enable_gqa=group > 1)

    with torch.enable_grad():
        if temperature == 1.0:
            return torch.autograd.grad(sdpa(scale), (q, k, v), grad_out)
        (dv,) = torch.autograd.grad(sdpa(scale), (v,), grad_out)
        dq, dk = torch.autograd.grad(sdpa(scale / temperature), (q, k), grad_out)
    return dq * temperature, dk * temperature, dv


class ChunkedGIMAttention(torch.autograd.Function):
    """Row-chunked attention with the GIM backward; see the module docstring for the math."""

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, sliding_window, softcap, key_padding_mask, temperature = inputs[:9]
        ctx.save_for_backward(q, k, v, key_padding_mask)
        ctx.args = (scale, causal, sliding_window, softcap, 1.0 if temperature is None else float(temperature),
                    *inputs[9:])
        ctx.sdpa = _use_sdpa(causal, sliding_window, softcap, key_padding_mask, q.dtype)

    @staticmethod
    def forward(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                temperature, q_scale, k_scale, v_scale, chunk_size):
        batch, q_heads, seq_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = q_heads // kv_heads
        ct = compute_dtype(q.dtype)
        if _use_sdpa(causal, sliding_window, softcap, key_padding_mask, q.dtype):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1)
        out = torch.empty(batch, kv_heads, group, seq_len, head_dim, dtype=q.dtype, device=q.device)
        for q_start in range(0, seq_len, chunk_size):
            q_end = min(seq_len, q_start + chunk_size)
            scores, _, _, _, _, v_tile = _tile(q, k, v, q_start, q_end, ct, group, scale, softcap, causal,
                                               sliding_window, key_padding_mask)
            probs, _ = _softmaxes(scores, 1.0)
            out[:, :, :, q_start:q_end] = (probs @ v_tile).view(batch, kv_heads, group, q_end - q_start, head_dim)
        return out.view(batch, q_heads, seq_len, head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = backward_op(_Cotangents(ctx), grad_out, q, k, v, key_padding_mask)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None

    @staticmethod
    def backward_one(ctx, grad_out, q, k, v, key_padding_mask):
        """The backward for one cotangent (``backward`` without vmap), given the saved tensors (a checkpointed
        layer's saved tensors may be read only once)."""
        scale, causal, sliding_window, softcap, t, q_scale, k_scale, v_scale, chunk_size = ctx.args
        batch, q_heads, seq_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = q_heads // kv_heads
        ct = compute_dtype(q.dtype)

        def finish(grad, factor, like):
            if factor is not None and factor != 1.0:
                grad = grad * factor
            return grad.reshape(like.shape).to(like.dtype)

        if ctx.sdpa:
            dq, dk, dv = _sdpa_backward(q, k, v, grad_out, scale, causal, t)
            return (finish(dq, q_scale, q), finish(dk, k_scale, k), finish(dv, v_scale, v),
                    None, None, None, None, None, None, None, None, None, None)

        dq = torch.empty(batch, kv_heads, group, seq_len, head_dim, dtype=ct, device=q.device)
        dk = torch.zeros(batch, kv_heads, seq_len, head_dim, dtype=ct, device=q.device)
        dv = torch.zeros_like(dk)
        for q_start in range(0, seq_len, chunk_size):
            q_end = min(seq_len, q_start + chunk_size)
            c = q_end - q_start
            scores, tanh, (lo, hi), q_tile, k_tile, v_tile = _tile(
                q, k, v, q_start, q_end, ct, group, scale, softcap, causal, sliding_window, key_padding_mask)
            probs, probs_t = _softmaxes(scores, t)
            del scores
            do_tile = grad_out[:, :, q_start:q_end].to(ct).reshape(batch, kv_heads, group * c, head_dim)

            dv[:, :, lo:hi] += probs.transpose(-1, -2) @ do_tile  # dV = Pᵀ dO with the true P
            del probs
            grad_s = do_tile @ v_tile.transpose(-1, -2)  # dP
            grad_s.sub_((grad_s * probs_t).sum(dim=-1, keepdim=True)).mul_(probs_t)
            if tanh is not None:
                grad_s.mul_(1.0 - tanh * tanh)
            grad_s.mul_(scale)
            dq[:, :, :, q_start:q_end] = (grad_s @ k_tile).view(batch, kv_heads, group, c, head_dim)
            dk[:, :, lo:hi] += grad_s.transpose(-1, -2) @ q_tile

        return (finish(dq, q_scale, q), finish(dk, k_scale, k), finish(dv, v_scale, v),
                None, None, None, None, None, None, None, None, None, None)


class _Cotangents:
    """The backward of one ``ChunkedGIMAttention`` call for one cotangent, or for a stack of them
    (``gim_fast.ops.cotangents``)."""

    grads = 1

    def __init__(self, ctx):
        self.ctx = ctx

    def one(self, grad_out, q, k, v, key_padding_mask):
        return ChunkedGIMAttention.backward_one(self.ctx, grad_out, q, k, v, key_padding_mask)[:3]

    def many(self, grad_out, q, k, v, key_padding_mask):
        scale, causal, sliding_window, softcap, t, q_scale, k_scale, v_scale, _ = self.ctx.args
        return chunked_backward_many(grad_out, q, k, v, scale=scale, causal=causal, sliding_window=sliding_window,
                                     softcap=softcap, key_padding_mask=key_padding_mask, temperature=t,
                                     q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)


def many_chunk_size(cotangents: int, batch: int, q_heads: int, seq_len: int, sliding_window: int | None) -> int:
    """Query rows per tile when ``cotangents`` share it: the dP/dS tiles of the whole stack stay about
    ``_TILE_ELEMENTS`` elements."""
    return max(16, auto_chunk_size(cotangents * batch, q_heads, seq_len, sliding_window))


def chunked_backward_many(grad_out, q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                          temperature, q_scale, k_scale, v_scale, chunk_size=None):
    """GIM attention backward for a stack of C cotangents ``grad_out [C, B, Hq, S, D]`` → dq ``[C, B, Hq, S, D]``,
    dk, dv ``[C, B, Hkv, S, D]``; the math of the module docstring, per cotangent.

    Each query tile's scores, P, P_T and O_T = P_T V are computed once and shared by the C cotangents, which are
    folded into the GEMMs: dP = dO Vᵀ and dQ = dS K stack the C cotangents' rows (C·G·c rows against one K/V
    tile), dV = Pᵀ dO puts them side by side (C·D columns), dK = dSᵀ Q is one GEMM per cotangent. The row sums
    come from the small side, Δ_T = rowsum(dP ⊙ P_T) = rowsum(dO ⊙ O_T), and enter dP's GEMM as its initial
    value, so that besides the GEMMs the C-fold score tiles see one elementwise pass (× P_T).
    """
    count = grad_out.shape[0]
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    bh = batch * kv_heads
    ct = compute_dtype(q.dtype)
    t = 1.0 if temperature is None else float(temperature)
    if chunk_size is None:
        chunk_size = many_chunk_size(count, batch, q_heads, seq_len, sliding_window)
    grad = grad_out.to(ct).unflatten(2, (kv_heads, group))  # a view at any strides: each tile copies its rows
    # accumulators in the layouts the tiles' GEMMs produce (a tile adds a contiguous block of rows)
    dq = torch.empty(bh, count, group, seq_len, head_dim, dtype=ct, device=q.device)
    dk = torch.zeros(bh, count, seq_len, head_dim, dtype=ct, device=q.device)
    dv = torch.zeros(bh, seq_len, count * head_dim, dtype=ct, device=q.device)
    for q_start in range(0, seq_len, chunk_size):
        q_end = min(seq_len, q_start + chunk_size)
        c = q_end - q_start
        rows = group * c
        scores, tanh, (lo, hi), q_tile, k_tile, v_tile = _tile(
            q, k, v, q_start, q_end, ct, group, scale, softcap, causal, sliding_window, key_padding_mask)
        n = hi - lo
        probs, probs_t = _softmaxes(scores, t)
        del scores
        o_t = (probs_t @ v_tile).reshape(bh, 1, rows, head_dim)                    # O_T = P_T V, shared
        weight = probs_t if tanh is None else probs_t * (1.0 - tanh * tanh)        # × soft-cap derivative
        do = grad[:, :, :, :, q_start:q_end].permute(1, 2, 0, 3, 4, 5)             # [B, Hkv, C, G, c, D]
        # dV = Pᵀ dO with the true P: the C cotangents as C·D columns of one GEMM
        do_cols = do.permute(0, 1, 3, 4, 2, 5).reshape(bh, rows, count * head_dim)
        dv[:, lo:hi].baddbmm_(probs.view(bh, rows, n).transpose(1, 2), do_cols)
        del probs
        # dS = P_T ⊙ (dP − Δ_T): the C cotangents' rows stacked, [B·Hkv, C·G·c, n]
        do_rows = do.reshape(bh, count, rows, head_dim)
        delta = (do_rows * o_t).sum(-1, keepdim=True).neg_().view(bh, count * rows, 1)
        grad_s = torch.baddbmm(delta, do_rows.reshape(bh, count * rows, head_dim),
                               v_tile.reshape(bh, n, head_dim).transpose(1, 2))
        grad_s.view(bh, count, rows, n).mul_(weight.view(bh, 1, rows, n))
        dq[:, :, :, q_start:q_end] = torch.bmm(grad_s, k_tile.reshape(bh, n, head_dim)).view(
            bh, count, group, c, head_dim)
        dk[:, :, lo:hi] += torch.matmul(grad_s.view(bh, count, rows, n).transpose(-1, -2),
                                        q_tile.reshape(bh, 1, rows, head_dim))
    # to [C, B, H, S, D] with the GIM factors (scale: dS was not multiplied by it)
    dq = dq.view(batch, kv_heads, count, group, seq_len, head_dim).permute(2, 0, 1, 3, 4, 5)
    dk = dk.view(batch, kv_heads, count, seq_len, head_dim).permute(2, 0, 1, 3, 4)
    dv = dv.view(batch, kv_heads, seq_len, count, head_dim).permute(3, 0, 1, 2, 4)
    factors = (scale * (1.0 if q_scale is None else q_scale), scale * (1.0 if k_scale is None else k_scale),
               1.0 if v_scale is None else v_scale)
    return tuple((g * f).reshape(count, *like.shape).to(like.dtype)
                 for g, f, like in zip((dq, dk, dv), factors, (q, k, v)))


def gim_attention_chunked(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                          temperature, q_scale, k_scale, v_scale, chunk_size=None):
    """Row-chunked GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype."""
    if chunk_size is None:
        chunk_size = auto_chunk_size(q.shape[0], q.shape[1], q.shape[2], sliding_window)
    return ChunkedGIMAttention.apply(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                                     temperature, q_scale, k_scale, v_scale, int(chunk_size))
