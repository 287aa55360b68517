"""The ``torch`` backend of ``gim_attention``: row-tiled GIM attention, O(S) memory, any device.

Routes, by structure (results differ only by float rounding; ``tests/ops/test_attention_torch_routes.py``):

    forward    CPU, float32/16-bit, no window, no soft-capping: torch's fused flash op
               ``_scaled_dot_product_flash_attention_for_cpu`` (output and row log-sum-exp LSE; key padding as an
               additive [B,1,1,S] mask). Other devices, same structure, no padding: ``scaled_dot_product_attention``
               (no LSE). Otherwise (windows, soft-capping, float64): the tiles below, with LSE.
    backward   T off after the CPU flash forward: torch's fused flash backward (it is the plain gradient).
               Otherwise: the GIM tiles below, P from the saved LSE (or from the tile, where no LSE was saved).

Tiles: query positions ``chunk_size`` at a time, each tile spanning *all* the key columns its rows may see, so
that softmaxes over its rows are complete. With S the scores as the softmax sees them (scaled, soft-capped,
masked) and y = S/T:

    forward    LSE = logsumexp(S),  O = softmax(S) V
    backward   P_T = softmax(y),    P = exp(T·y − LSE)            (P_T itself when T = 1)
               dV += Pᵀ dO                                        (the true P)
               dP  = dO Vᵀ,   dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T))   (GIM; torch's fused softmax backward at P_T)
               dS_raw = dS ⊙ (1 − tanh²(S_raw / cap))              (soft-capping)
               dQ  = scale · dS_raw K,   dK += scale · dS_rawᵀ Q   (then × q/k/v scale)

Only the columns a mask can touch are masked (the diagonal block, a window's left edge; every column only with
key padding). A query row with no allowed key (left padding) outputs 0 and passes no gradient. GQA: the
``G = Hq/Hkv`` query heads sharing a KV head are laid out as ``S·G`` rows (position-major) against that one KV
head, so a tile is a plain 2-D slice, K and V are never repeated, and dK, dV sum over the group inside the GEMM.
The loops are sequential and nothing accumulates with atomics: results are deterministic.

Why these routes: GIM needs two softmaxes of one score matrix (P for dV, P_T for dQ, dK) and a fused kernel
computes one. Two fused SDPA passes do 16 GEMM passes where the plain gradient does 7; these tiles do the 7 GEMMs
of the plain gradient plus four element-wise passes (softmax, add, exp, fused softmax backward), reusing
tile-sized buffers and building each mask once per call. docs/performance.md has the measurements behind the
choice, and the alternatives that were weighed.

Tile size (``auto_chunk_size``): ~96 stacked rows per KV head, at least 32 positions, within a score-tile budget
at long context.

With M cotangents (``grad_out`` ``[M, B, Hq, S, D]``, see ``attention_backward``: ``explain_answer``'s stack
under ``torch.func.vmap``, handed over by ``gim_fast.ops.cotangents.backward_op``) each tile computes its scores,
P and P_T once and every GEMM takes the whole stack (``_stacked_backward``: dO stacked as M·c·G rows for dP and dQ,
side by side as M·D columns for dV; dS = P_T ⊙ (dP − Δ) with Δ = dO · O_T, O_T = P_T V, since a fused softmax
backward would need P_T copied M times); this beats M GEMMs of each kind per tile (docs/performance.md). The
stack holds one dP/dS buffer M tiles large (the memory estimate counts M × all tile buffers). The fused plain backward runs once
per cotangent on the saved output and LSE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..settings import tempered
from .attention_eager import compute_dtype
from .cotangents import backward_op, unbatched_forward_only
from .masks import allowed_tile, key_range

# Query positions per tile: at least _MIN_POSITIONS, and enough for _STACKED_ROWS rows once the G query heads
# of a KV head are stacked (GEMMs wide enough to run near the CPU's best at the supported shapes), but never more than _TILE_ELEMENTS (B·Hq·positions·keys) per score tile: at long context the tile
# budget wins, down to one position per tile. The backward holds four or five such tiles.
_STACKED_ROWS = 96
_MIN_POSITIONS = 32
_TILE_ELEMENTS = 1 << 22

# torch's CPU flash attention ops (torch >= 2.2):
#   forward  (q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (out, logsumexp)
#   backward (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)
# They take fewer KV heads than query heads from torch 2.13 on (the tests check it); with an older torch K/V are
# repeated for them (a copy of O(S·D)).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_CPU_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def auto_chunk_size(batch: int, q_heads: int, kv_heads: int, seq_len: int, sliding_window: int | None) -> int:
    """Query positions per tile (see ``_STACKED_ROWS``, ``_MIN_POSITIONS`` and ``_TILE_ELEMENTS``)."""
    keys = seq_len if sliding_window is None else min(seq_len, sliding_window + _MIN_POSITIONS)
    wanted = max(_MIN_POSITIONS, -(-_STACKED_ROWS // (q_heads // kv_heads)))
    budget = _TILE_ELEMENTS // max(1, batch * q_heads * keys)
    return int(max(1, min(seq_len, wanted, budget)))


def _flash_cpu_inputs(q, k, v, key_padding_mask):
    """k, v and the attention mask as the CPU flash ops take them: K/V repeated where the op has no GQA, key
    padding as an additive ``[B, 1, 1, S]`` mask (a query row with no key then outputs 0, with LSE 0)."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _FLASH_CPU_GQA:
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    mask = None
    if key_padding_mask is not None:
        mask = torch.zeros(q.shape[0], 1, 1, q.shape[2], dtype=q.dtype, device=q.device)
        mask.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    return k, v, mask


def _fused_forward(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask):
    """``(out, lse or None)`` from torch's fused attention where it expresses the structure without a dense
    mask, else None. On the CPU its flash op (lse ``[B, Hq, S]`` float32); elsewhere
    ``scaled_dot_product_attention`` (no LSE, no padding). float64 stays on the tiles (the tests' float64
    references)."""
    if sliding_window is not None or softcap is not None or q.dtype not in _FUSED_DTYPES:
        return None
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        k, v, mask = _flash_cpu_inputs(q, k, v, key_padding_mask)
        return _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if key_padding_mask is not None:
        return None
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1), None


def _fused_backward_ok(q, lse, temperature, sliding_window, softcap) -> bool:
    """The plain gradient (T off) after the CPU flash forward: torch's fused backward is exactly it."""
    return (tempered(temperature) is None and lse is not None and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES
            and _FLASH_CPU_BACKWARD is not None and sliding_window is None and softcap is None)


def _fused_backward(q, k, v, out, lse, grad_out, scale, causal, key_padding_mask):
    """(dq, dk, dv) of ordinary attention from the CPU flash backward; ``grad_out`` may carry a leading M (one
    call per cotangent, each reusing the saved ``out`` and ``lse``)."""
    if grad_out.dim() == 5:
        return tuple(torch.stack(g) for g in zip(*(
            _fused_backward(q, k, v, out, lse, g, scale, causal, key_padding_mask) for g in grad_out)))
    k_in, v_in, mask = _flash_cpu_inputs(q, k, v, key_padding_mask)
    dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out.contiguous(), q, k_in, v_in, out, lse, 0.0, causal, attn_mask=mask,
                                     scale=scale)
    if k_in.shape[1] != k.shape[1]:  # K/V were repeated for the op: sum the group back
        dk, dv = (g.unflatten(1, (k.shape[1], -1)).sum(2) for g in (dk, dv))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------- layout
def _row_tile(x, kv_heads, q_start, q_end, dtype, factor=None):
    """Positions ``[q_start, q_end)`` of ``x`` ``[..., B, Hq, S, D]`` as a new ``[..., B·Hkv, c·G, D]`` tensor in
    ``dtype`` (× ``factor``): the G query heads of a KV head stacked, row (i − q_start)·G + g."""
    part = x[..., q_start:q_end, :].unflatten(-3, (kv_heads, -1)).transpose(-3, -2)  # [..., B, Hkv, c, G, D]
    tile = torch.empty(part.shape, dtype=dtype, device=x.device).copy_(part).flatten(-5, -4).flatten(-3, -2)
    return tile if factor is None else tile.mul_(factor)


def _put_row_tile(dst, tile, kv_heads, q_start, q_end):
    """The inverse of ``_row_tile``: write ``tile`` into positions ``[q_start, q_end)`` of ``dst``."""
    part = dst[..., q_start:q_end, :].unflatten(-3, (kv_heads, -1)).transpose(-3, -2)
    part.copy_(tile.view(part.shape))


# ------------------------------------------------------------------------------------------------------ tiles
def _mask_spans(q_start, q_end, lo, hi, causal, sliding_window, padded):
    """Key column spans ``[a, b)`` of the tile where some row may not see some key; elsewhere all are allowed."""
    if padded:
        return [(lo, hi)]
    spans = []
    if sliding_window is not None:  # row i keeps j > i − w: the left edge of the band
        spans.append((lo, min(hi, q_end - sliding_window)))
    if causal:  # row i keeps j <= i: the diagonal block
        spans.append((max(lo, q_start + 1), hi))
    spans = sorted((a, b) for a, b in spans if a < b)
    merged = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class _Tiles:
    """The tiles of one call — query positions ``[q_start, q_end)`` against the key columns ``[lo, hi)`` they may
    see — with their masks and ``count`` reusable score-sized buffers. Scores are laid out ``[B·Hkv, c·G, n]``.

    Why buffers: a fresh tile-sized tensor per tile costs more than the tile's GEMM (large allocations come back
    from the system as new pages, and every page faults on first touch). Why cached masks: a causal or window
    edge block depends only on its offset from the diagonal, so each is built once per call.
    """

    def __init__(self, k_r, kv_heads, group, chunk_size, *, causal, sliding_window, key_padding_mask, count):
        batch_heads, seq_len = k_r.shape[:2]
        self.spans = []
        for q_start in range(0, seq_len, chunk_size):
            q_end = min(seq_len, q_start + chunk_size)
            self.spans.append((q_start, q_end) + key_range(q_start, q_end, seq_len, causal, sliding_window))
        self.batch_heads, self.kv_heads, self.group = batch_heads, kv_heads, group
        self.causal, self.sliding_window, self.key_padding_mask = causal, sliding_window, key_padding_mask
        self._masks = {}
        numel = max(batch_heads * (e - s) * group * (hi - lo) for s, e, lo, hi in self.spans)
        self.numel = numel  # of the largest tile
        self._buffers = torch.empty(count, numel, dtype=k_r.dtype, device=k_r.device)

    def buffer(self, index, q_start, q_end, lo, hi):
        """Buffer ``index`` as one tile's scores, ``[B·Hkv, (q_end − q_start)·G, hi − lo]``, contiguous."""
        shape = (self.batch_heads, (q_end - q_start) * self.group, hi - lo)
        return self._buffers[index, :shape[0] * shape[1] * shape[2]].view(shape)

    def mask(self, scores, q_start, q_end, lo, hi):
        """−inf, in place, where query i may not attend to key j; only the columns a mask can touch."""
        c = q_end - q_start
        view = scores.view(-1, self.kv_heads, c, self.group, hi - lo)  # [B, Hkv, c, G, n]
        padded = self.key_padding_mask is not None
        for a, b in _mask_spans(q_start, q_end, lo, hi, self.causal, self.sliding_window, padded):
            key = (q_start - a, c, b - a)
            blocked = None if padded else self._masks.get(key)
            if blocked is None:
                allowed = allowed_tile(q_start, q_end, a, b, causal=self.causal, sliding_window=self.sliding_window,
                                       key_padding_mask=self.key_padding_mask, device=scores.device)
                blocked = ~allowed[:, :, :, None]  # [B|1, 1, c, 1, b − a]
                if not padded:  # with padding every tile differs
                    self._masks[key] = blocked
            view[..., a - lo:b - lo].masked_fill_(blocked, float("-inf"))


def _logits(q_t, k_t, temperature, softcap, out, tanh_out=None):
    """S/T of one tile into ``out`` (unmasked), S the scores as the softmax sees them, from ``q_t``
    pre-multiplied by scale/T; with soft-capping also tanh(raw/cap) into ``tanh_out`` (or in place, if None)."""
    logits = torch.bmm(q_t, k_t.transpose(1, 2), out=out)
    if softcap is None:
        return logits
    if tanh_out is None:
        return logits.mul_(temperature / softcap).tanh_().mul_(softcap / temperature)
    torch.mul(logits, temperature / softcap, out=tanh_out).tanh_()
    return torch.mul(tanh_out, softcap / temperature, out=logits)


def _softmax(logits, empty, out):
    """softmax over a tile's complete rows into ``out``, with 0 on the rows ``empty`` marks (None: none)."""
    probs = torch.softmax(logits, dim=-1, out=out)
    return probs if empty is None else probs.masked_fill_(empty, 0.0)


# -------------------------------------------------------------------------------------------------- forward
def attention_forward(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask, chunk_size):
    """Ordinary attention. Returns ``(out [B,Hq,S,D] in q's dtype, lse [B,Hq,S] float32/64 or None)``.

    ``lse`` is what ``attention_backward`` recomputes P from (0 on a row with no allowed key, whose P is 0
    anyway); ``None`` where the fused op of a non-CPU device gives none (the backward then takes P from its own
    tiles).
    """
    fused = _fused_forward(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask)
    if fused is not None:
        return fused
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    ct = compute_dtype(q.dtype)
    k_r, v_r = (t.to(ct).reshape(batch * kv_heads, seq_len, head_dim) for t in (k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1] + (1,), dtype=ct, device=q.device)
    tiles = _Tiles(k_r, kv_heads, group, chunk_size, causal=causal, sliding_window=sliding_window,
                   key_padding_mask=key_padding_mask, count=2)
    for span in tiles.spans:
        q_start, q_end, lo, hi = span
        q_t = _row_tile(q, kv_heads, q_start, q_end, ct, scale)
        scores = _logits(q_t, k_r[:, lo:hi], 1.0, softcap, tiles.buffer(0, *span))
        tiles.mask(scores, *span)
        tile_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        out_t = torch.bmm(torch.softmax(scores, dim=-1, out=tiles.buffer(1, *span)), v_r[:, lo:hi])
        if key_padding_mask is not None:  # a row with no allowed key: 0 out, LSE 0 (as the fused op gives)
            empty = tile_lse == float("-inf")
            out_t.masked_fill_(empty, 0.0)
            tile_lse.masked_fill_(empty, 0.0)
        _put_row_tile(out, out_t, kv_heads, q_start, q_end)
        _put_row_tile(lse, tile_lse, kv_heads, q_start, q_end)
    return out, lse[..., 0]


# ------------------------------------------------------------------------------------------------- backward
def attention_backward(grad_out, q, k, v, out, lse, *, scale, causal, sliding_window, softcap, key_padding_mask,
                       temperature, q_scale, k_scale, v_scale, chunk_size):
    """The GIM backward of ``attention_forward`` as a function of plain tensors: ``(dq, dk, dv)``.

    Args:
        q, k, v: the forward's inputs; out: its output, needed only where ``_fused_backward_ok`` (T off after the
            CPU flash forward: the backward is then torch's fused one), else None; lse: its ``lse`` (``None``:
            each tile takes P from its own scores).
        grad_out: ``[B, Hq, S, D]``, or ``[M, B, Hq, S, D]`` for M cotangents at once (the answer's M targets):
            each tile recomputes P and P_T once and serves all M; the gradients then carry the same leading M.
        temperature: T (``None`` or 1.0 = the plain gradient); q/k/v_scale: factors on dq, dk, dv (``None`` = 1).

    Returns dq, dk, dv in the dtypes of q, k, v (float32 math for 16-bit inputs).
    """
    def scaled(grad, factor, like):
        if factor is not None and factor != 1.0:
            grad = grad * factor
        return grad.to(like.dtype)

    if out is not None and _fused_backward_ok(q, lse, temperature, sliding_window, softcap):
        dq, dk, dv = _fused_backward(q, k, v, out, lse, grad_out, scale, causal, key_padding_mask)
        return scaled(dq, q_scale, q), scaled(dk, k_scale, k), scaled(dv, v_scale, v)

    t = tempered(temperature) or 1.0
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    ct = compute_dtype(q.dtype)
    single = grad_out.dim() == 4
    grads = grad_out[None] if single else grad_out  # [M, B, Hq, S, D]
    k_r, v_r = (x.to(ct).reshape(batch * kv_heads, seq_len, head_dim) for x in (k, v))
    q_factor = scale * (1.0 if q_scale is None else q_scale)

    # buffers: 0 S/T, then dP; 1 P_T; 2 P; 3 dS; 4 tanh, then 1 − tanh²
    tiles = _Tiles(k_r, kv_heads, group, chunk_size, causal=causal, sliding_window=sliding_window,
                   key_padding_mask=key_padding_mask, count=5 if softcap else 4)
    if grads.shape[0] > 1:
        dq, dk, dv = _stacked_backward(tiles, grads, q, k_r, v_r, lse, t, scale, q_factor, softcap)
    else:
        dq, dk, dv = _one_backward(tiles, grads[0], q, k_r, v_r, lse, t, scale, q_factor, softcap)
    dk, dv = _finish(dk, k_scale, k), _finish(dv, v_scale, v)
    return (dq[0], dk[0], dv[0]) if single else (dq, dk, dv)


def _one_backward(tiles, grad_out, q, k_r, v_r, lse, t, scale, q_factor, softcap):
    """One cotangent ``[B, Hq, S, D]``: ``(dq [1, B, Hq, S, D], dk, dv [1, B·Hkv, S, D] float32)``, P_T's softmax
    backward fused (``_softmax_backward_data``)."""
    kv_heads, ct = tiles.kv_heads, k_r.dtype
    dq = torch.empty((1,) + grad_out.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros((1,) + k_r.shape, dtype=ct, device=q.device)
    dv = torch.zeros_like(dk)
    for span in tiles.spans:
        q_start, q_end, lo, hi = span
        q_t, k_t, v_t, probs_t, probs, tanh = _probabilities(tiles, span, q, k_r, v_r, lse, t, scale, softcap)
        do_t = _row_tile(grad_out, kv_heads, q_start, q_end, k_r.dtype)  # [B·Hkv, c·G, D]
        dv[0, :, lo:hi].baddbmm_(probs.transpose(1, 2), do_t)  # dV = Pᵀ dO with the true P
        grad_p = torch.bmm(do_t, v_t.transpose(1, 2), out=tiles.buffer(0, *span))
        grad_s = torch.ops.aten._softmax_backward_data.out(grad_p, probs_t, -1, ct, grad_input=tiles.buffer(3, *span))
        if tanh is not None:
            grad_s.mul_(tanh)
        _put_row_tile(dq[0], torch.bmm(grad_s, k_t).mul_(q_factor), kv_heads, q_start, q_end)
        dk[0, :, lo:hi].baddbmm_(grad_s.transpose(1, 2), q_t, alpha=t)  # scale·dSᵀ Q = T·dSᵀ (Q·scale/T)
    return dq, dk, dv


def _finish(grad, factor, like):
    """An accumulated ``[M, B·Hkv, S, D]`` gradient × ``factor`` as ``[M, B, Hkv, S, D]`` in ``like``'s dtype."""
    if factor is not None and factor != 1.0:
        grad.mul_(factor)
    return grad.reshape(-1, *like.shape).to(like.dtype)


def _probabilities(tiles, span, q, k_r, v_r, lse, t, scale, softcap):
    """One tile's shared part of the backward: ``(q_t, k_t, v_t, P_T, P, 1 − tanh² or None)``, with q_t the
    query rows × scale/T (so that the score GEMM gives S/T), P_T = softmax(S/T) and P the true softmax (from the
    saved LSE, else from the tile); buffers 0 (S/T), 1 (P_T), 2 (P) and 4 (tanh) of ``tiles`` are used."""
    q_start, q_end, lo, hi = span
    ct = k_r.dtype
    q_t = _row_tile(q, tiles.kv_heads, q_start, q_end, ct, scale / t)
    k_t, v_t = k_r[:, lo:hi], v_r[:, lo:hi]
    tanh = tiles.buffer(4, *span) if softcap is not None else None
    y = _logits(q_t, k_t, t, softcap, tiles.buffer(0, *span), tanh)  # S/T
    tiles.mask(y, *span)
    # a row with no allowed key (left padding): softmax gives NaN, GIM passes nothing
    empty = y.amax(dim=-1, keepdim=True) == float("-inf") if tiles.key_padding_mask is not None else None
    probs_t = _softmax(y, empty, tiles.buffer(1, *span))
    if t == 1.0:
        probs = probs_t
    elif lse is not None:  # P = exp(S − LSE) (0 on a row without keys: its S/T is all −inf)
        neg_lse = _row_tile(lse[..., None], tiles.kv_heads, q_start, q_end, ct, -1.0)
        probs = torch.add(neg_lse, y, alpha=t, out=tiles.buffer(2, *span)).exp_()
    else:
        probs = _softmax(y.mul_(t), empty, tiles.buffer(2, *span))
    if tanh is not None:
        tanh.mul_(tanh).neg_().add_(1.0)  # the soft-cap's derivative, 1 − tanh²
    return q_t, k_t, v_t, probs_t, probs, tanh


def _stacked_tiles(grads, kv_heads, q_start, q_end, dtype):
    """Rows ``[q_start, q_end)`` of M cotangents ``[M, B, Hq, S, D]`` in the two layouts the stacked GEMMs take:
    ``[B·Hkv, M·c·G, D]`` (cotangent-major rows, for dP = dO Vᵀ) and ``[B·Hkv, c·G, M·D]`` (cotangents side by
    side, for dV = Pᵀ dO)."""
    m, b, _, _, d = grads.shape
    part = grads[..., q_start:q_end, :].unflatten(2, (kv_heads, -1))  # [M, B, Hkv, G, c, D]
    rows = torch.empty((b, kv_heads, m, q_end - q_start, part.shape[3], d), dtype=dtype, device=grads.device)
    rows.copy_(part.permute(1, 2, 0, 4, 3, 5))
    cols = torch.empty((b, kv_heads, q_end - q_start, part.shape[3], m, d), dtype=dtype, device=grads.device)
    cols.copy_(part.permute(1, 2, 4, 3, 0, 5))
    return rows.view(b * kv_heads, -1, d), cols.view(b * kv_heads, -1, m * d)


def _stacked_backward(tiles, grads, q, k_r, v_r, lse, t, scale, q_factor, softcap):
    """``attention_backward`` for M > 1 cotangents: each tile's P and P_T serve the whole stack, and every GEMM
    takes all M at once (M times taller or wider) instead of M small GEMMs. dS without a fused softmax backward:
    rowsum(dP ⊙ P_T) = dO · O_T with O_T = P_T V computed once per tile (flash attention's Δ), so that
    dS = P_T ⊙ (dP − Δ) is two in-place passes over the stacked dP. Returns dq ``[M, B, Hq, S, D]`` and dk, dv
    ``[M, B·Hkv, S, D]`` (float32)."""
    m = grads.shape[0]
    batch_heads, seq_len, head_dim = k_r.shape
    kv_heads, ct = tiles.kv_heads, k_r.dtype
    dq = torch.empty(grads.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(batch_heads, m, seq_len, head_dim, dtype=ct, device=q.device)  # cotangent-major, per head
    dv = torch.zeros(batch_heads, seq_len, m * head_dim, dtype=ct, device=q.device)  # cotangents side by side
    stack = torch.empty(m * tiles.numel, dtype=ct, device=q.device)  # dP, then dS in place, of all M
    for span in tiles.spans:
        q_start, q_end, lo, hi = span
        q_t, k_t, v_t, probs_t, probs, tanh = _probabilities(tiles, span, q, k_r, v_r, lse, t, scale, softcap)
        rows = probs_t.shape[1]
        do_rows, do_cols = _stacked_tiles(grads, kv_heads, q_start, q_end, ct)
        dv[:, lo:hi].baddbmm_(probs.transpose(1, 2), do_cols)  # dV = Pᵀ dO with the true P, all M at once
        out_t = torch.bmm(probs_t, v_t)  # O_T = P_T V
        delta = (do_rows.view(batch_heads, m, rows, head_dim) * out_t[:, None]).sum(-1, keepdim=True)
        grad_s = stack[:batch_heads * m * rows * (hi - lo)].view(batch_heads, m, rows, hi - lo)
        torch.bmm(do_rows, v_t.transpose(1, 2), out=grad_s.view(batch_heads, m * rows, hi - lo))  # dP = dO Vᵀ
        grad_s.sub_(delta).mul_(probs_t[:, None])  # dS = P_T ⊙ (dP − Δ)
        if tanh is not None:
            grad_s.mul_(tanh[:, None])
        dq_t = torch.bmm(grad_s.view(batch_heads, m * rows, hi - lo), k_t).mul_(q_factor)  # [B·Hkv, M·c·G, D]
        _put_row_tile(dq, dq_t.view(batch_heads, m, rows, head_dim).transpose(0, 1), kv_heads, q_start, q_end)
        q_m = q_t[:, None].expand(batch_heads, m, rows, head_dim).reshape(batch_heads * m, rows, head_dim)
        dk.view(batch_heads * m, seq_len, head_dim)[:, lo:hi].baddbmm_(
            grad_s.view(batch_heads * m, rows, hi - lo).transpose(1, 2), q_m, alpha=t)  # T·dSᵀ (Q·scale/T)
    return dq, dk.transpose(0, 1), dv.view(batch_heads, seq_len, m, head_dim).permute(2, 0, 1, 3)


class ChunkedGIMAttention(torch.autograd.Function):
    """Attention with the GIM backward; see the module docstring for the math and the routes.

    The forward returns ``(out, lse)``: the LSE is non-differentiable (None where the forward gave none) and
    exists so that ``setup_context`` — the form torch.func needs — can save it. The backward reads the saved
    tensors once (a checkpointed layer's may be read only once) and hands them, with the cotangent, to
    ``backward_op``: one cotangent or, under ``torch.func.vmap`` over the cotangents, the whole stack goes to
    ``attention_backward`` in one call.
    """

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                temperature, q_scale, k_scale, v_scale, chunk_size):
        return attention_forward(q, k, v, scale=scale, causal=causal, sliding_window=sliding_window,
                                 softcap=softcap, key_padding_mask=key_padding_mask, chunk_size=chunk_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
         temperature, q_scale, k_scale, v_scale, chunk_size) = inputs
        out, lse = output
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        # the output is kept only for the fused plain-gradient backward (it costs O(S·D) per layer)
        keep = out if _fused_backward_ok(q, lse, temperature, sliding_window, softcap) else None
        ctx.save_for_backward(q, k, v, keep, lse, key_padding_mask)
        ctx.args = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
                        temperature=temperature, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
                        chunk_size=chunk_size)

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        dq, dk, dv = backward_op(_ChunkedAttentionRule(ctx.args), grad_out, *ctx.saved_tensors)
        return (dq, dk, dv) + (None,) * 10


class _ChunkedAttentionRule:
    """``attention_backward`` as a :class:`~gim_fast.ops.cotangents.CotangentRule`: it takes one cotangent
    ``[B,Hq,S,D]`` or a stack ``[M,B,Hq,S,D]`` (each tile's scores, P and P_T computed once for the stack), so
    ``many`` is ``one``."""

    grads = 1

    def __init__(self, args):
        self.args = args

    def one(self, grad_out, q, k, v, out, lse, key_padding_mask):
        return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask=key_padding_mask, **self.args)

    many = one


def gim_attention_chunked(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                          temperature, q_scale, k_scale, v_scale, chunk_size=None):
    """Row-tiled GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype."""
    if chunk_size is None:
        chunk_size = auto_chunk_size(q.shape[0], q.shape[1], k.shape[1], q.shape[2], sliding_window)
    out, _ = ChunkedGIMAttention.apply(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                                       temperature, q_scale, k_scale, v_scale, int(chunk_size))
    return out
