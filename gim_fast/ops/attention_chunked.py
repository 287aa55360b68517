"""The ``torch`` backend of ``gim_attention``: row-chunked, O(S·chunk) memory, any device.

Query rows are processed ``chunk_size`` at a time against the key columns they may see (all earlier keys,
or the last ``sliding_window`` of them). The forward pass keeps only the per-row log-sum-exp of the scores
(``lse``, and ``lse_t`` for the temperature); the backward pass recomputes each tile's probabilities from it,
the way flash attention does, so no S×S matrix is ever held.

Per tile, with S the scores exactly as the softmax sees them (scaled, soft-capped, masked):

    forward   P   = exp(S − lse),        O  = P V
    backward  P_T = exp(S/T − lse_t),    dP = dO Vᵀ
              dS  = P_T ⊙ (dP − rowsum(dP ⊙ P_T))        (GIM; T = None gives P_T = P, plain attention)
              dS_raw = dS ⊙ (1 − tanh²(S_raw / cap))     (soft-capping)
              dQ = scale·dS_raw K,  dK = scale·dS_rawᵀ Q,  dV = Pᵀ dO     (then × q/k/v scale)

GQA: the ``G = Hq / Hkv`` query heads sharing a KV head are stacked as ``G·chunk`` rows against that one KV head,
so K and V are never repeated; dK and dV sum over the group by the same matmul. A query row with no allowed key
gets lse = +inf, hence P = 0: it outputs 0 and passes no gradient. The loop is sequential: results are
deterministic.
"""
from __future__ import annotations

import torch

from .attention_eager import compute_dtype
from .masks import allowed_tile, key_range

# Elements of one fp32 score tile (B·Hq·chunk·keys) the automatic chunk size aims for: 2^24 ≈ 64 MB.
_TILE_ELEMENTS = 1 << 24


def auto_chunk_size(batch: int, q_heads: int, seq_len: int, sliding_window: int | None) -> int:
    """Query rows per chunk so that one score tile holds about ``_TILE_ELEMENTS`` elements."""
    keys = seq_len if sliding_window is None else min(seq_len, sliding_window + 64)
    rows = _TILE_ELEMENTS // max(1, batch * q_heads * keys)
    return int(max(16, min(seq_len, rows)))


def _tile_scores(q_tile, k_tile, scale, softcap):
    """Scores of a tile ``[B,Hkv,G·c,n]`` and, with soft-capping, the tanh needed by its derivative."""
    raw = (q_tile @ k_tile.transpose(-1, -2)) * scale
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, t


def _masked(scores, allowed, group):
    """Fill disallowed entries with −inf; ``allowed`` is ``[B|1,1,c,n]``, scores ``[B,Hkv,G·c,n]``."""
    b, hkv, gc, n = scores.shape
    view = scores.view(b, hkv, group, gc // group, n)
    return view.masked_fill(~allowed[:, :, None], float("-inf")).view(b, hkv, gc, n)


def _stable_lse(scores, temperature=1.0):
    """Row log-sum-exp of ``scores / temperature``; a row with no allowed key gets +inf (so exp(S − lse) = 0)."""
    lse = torch.logsumexp(scores / temperature if temperature != 1.0 else scores, dim=-1, keepdim=True)
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


class ChunkedGIMAttention(torch.autograd.Function):
    """Row-chunked attention with the GIM backward; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                temperature, q_scale, k_scale, v_scale, chunk_size):
        batch, q_heads, seq_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = q_heads // kv_heads
        ct = compute_dtype(q.dtype)
        t = 1.0 if temperature is None else float(temperature)

        out = torch.empty(batch, kv_heads, group, seq_len, head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, kv_heads, group, seq_len, dtype=ct, device=q.device)
        lse_t = torch.empty_like(lse) if t != 1.0 else lse
        for q_start in range(0, seq_len, chunk_size):
            q_end = min(seq_len, q_start + chunk_size)
            c = q_end - q_start
            lo, hi = key_range(q_start, q_end, seq_len, causal, sliding_window)
            q_tile = q[:, :, q_start:q_end].to(ct).reshape(batch, kv_heads, group * c, head_dim)
            k_tile, v_tile = k[:, :, lo:hi].to(ct), v[:, :, lo:hi].to(ct)
            allowed = allowed_tile(q_start, q_end, lo, hi, causal=causal, sliding_window=sliding_window,
                                   key_padding_mask=key_padding_mask, device=q.device)
            scores, _ = _tile_scores(q_tile, k_tile, scale, softcap)
            scores = _masked(scores, allowed, group)
            row_lse = _stable_lse(scores)
            out[:, :, :, q_start:q_end] = (torch.exp(scores - row_lse) @ v_tile).view(
                batch, kv_heads, group, c, head_dim)
            lse[:, :, :, q_start:q_end] = row_lse.view(batch, kv_heads, group, c)
            if t != 1.0:
                lse_t[:, :, :, q_start:q_end] = _stable_lse(scores, t).view(batch, kv_heads, group, c)

        ctx.save_for_backward(q, k, v, key_padding_mask, lse, lse_t)
        ctx.args = (scale, causal, sliding_window, softcap, t, q_scale, k_scale, v_scale, chunk_size)
        return out.view(batch, q_heads, seq_len, head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, lse, lse_t = ctx.saved_tensors
        scale, causal, sliding_window, softcap, t, q_scale, k_scale, v_scale, chunk_size = ctx.args
        batch, q_heads, seq_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = q_heads // kv_heads
        ct = lse.dtype

        dq = torch.zeros(batch, kv_heads, group, seq_len, head_dim, dtype=ct, device=q.device)
        dk = torch.zeros(batch, kv_heads, seq_len, head_dim, dtype=ct, device=q.device)
        dv = torch.zeros_like(dk)
        for q_start in range(0, seq_len, chunk_size):
            q_end = min(seq_len, q_start + chunk_size)
            c = q_end - q_start
            lo, hi = key_range(q_start, q_end, seq_len, causal, sliding_window)
            q_tile = q[:, :, q_start:q_end].to(ct).reshape(batch, kv_heads, group * c, head_dim)
            do_tile = grad_out[:, :, q_start:q_end].to(ct).reshape(batch, kv_heads, group * c, head_dim)
            k_tile, v_tile = k[:, :, lo:hi].to(ct), v[:, :, lo:hi].to(ct)
            allowed = allowed_tile(q_start, q_end, lo, hi, causal=causal, sliding_window=sliding_window,
                                   key_padding_mask=key_padding_mask, device=q.device)
            scores, tanh = _tile_scores(q_tile, k_tile, scale, softcap)
            scores = _masked(scores, allowed, group)

            row_lse = lse[:, :, :, q_start:q_end].reshape(batch, kv_heads, group * c, 1)
            probs = torch.exp(scores - row_lse)
            if t != 1.0:
                row_lse_t = lse_t[:, :, :, q_start:q_end].reshape(batch, kv_heads, group * c, 1)
                probs_t = torch.exp(scores / t - row_lse_t)
            else:
                probs_t = probs

            dv[:, :, lo:hi] += probs.transpose(-1, -2) @ do_tile  # dV = Pᵀ dO with the true P
            grad_p = do_tile @ v_tile.transpose(-1, -2)
            grad_s = probs_t * (grad_p - (grad_p * probs_t).sum(dim=-1, keepdim=True))
            if tanh is not None:
                grad_s = grad_s * (1.0 - tanh * tanh)
            grad_s = grad_s * scale
            dq[:, :, :, q_start:q_end] = (grad_s @ k_tile).view(batch, kv_heads, group, c, head_dim)
            dk[:, :, lo:hi] += grad_s.transpose(-1, -2) @ q_tile

        def finish(grad, factor, like):
            if factor is not None and factor != 1.0:
                grad = grad * factor
            return grad.reshape(like.shape).to(like.dtype)

        return (finish(dq, q_scale, q), finish(dk, k_scale, k), finish(dv, v_scale, v),
                None, None, None, None, None, None, None, None, None, None)


def gim_attention_chunked(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                          temperature, q_scale, k_scale, v_scale, chunk_size=None):
    """Row-chunked GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype."""
    if chunk_size is None:
        chunk_size = auto_chunk_size(q.shape[0], q.shape[1], q.shape[2], sliding_window)
    return ChunkedGIMAttention.apply(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                                     temperature, q_scale, k_scale, v_scale, int(chunk_size))
