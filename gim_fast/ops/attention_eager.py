"""The eager backend of ``gim_attention``: the whole attention matrix, materialised.

This is the readable ground truth and the benchmark baseline: every step is a plain torch op, the backward is
torch's autograd except for the two GIM rules, each a few lines below (``TemperedSoftmax`` and ``scale_grad``).
Memory is O(B·H·S²); use the ``torch`` (row-chunked) or ``triton`` backend for long inputs.
"""
from __future__ import annotations

import torch

from ..settings import tempered
from .cotangents import unbatched_forward_only
from .grad_scale import scale_grad
from .masks import allowed_tile


class TemperedSoftmax(torch.autograd.Function):
    """P = softmax(S) in the forward pass; the GIM rule in the backward pass.

    With P_T = softmax(S / T):  dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T)).  There is no 1/T factor: this is
    T × the true gradient of softmax(S / T). Entries masked with −inf get P = P_T = 0 and no gradient.
    """

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(scores: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        scores, ctx.temperature = inputs
        ctx.save_for_backward(scores)

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (scores,) = ctx.saved_tensors
        p_t = torch.softmax(scores / ctx.temperature, dim=-1)
        grad_s = p_t * (grad_p - (grad_p * p_t).sum(dim=-1, keepdim=True))
        return grad_s, None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax math runs in float32, or in float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gim_attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    key_padding_mask: torch.Tensor | None,
    temperature: float | None,
    q_scale: float | None,
    k_scale: float | None,
    v_scale: float | None,
) -> torch.Tensor:
    """Materialised GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype."""
    batch, q_heads, seq_len, _ = q.shape
    group = q_heads // k.shape[1]
    out_dtype, ct = q.dtype, compute_dtype(q.dtype)

    q = scale_grad(q, q_scale).to(ct)
    k = scale_grad(k, k_scale).to(ct).repeat_interleave(group, dim=1)
    v = scale_grad(v, v_scale).to(ct).repeat_interleave(group, dim=1)

    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = allowed_tile(
        0, seq_len, 0, seq_len, causal=causal, sliding_window=sliding_window,
        key_padding_mask=key_padding_mask, device=q.device,
    )
    # A query row with no allowed key (a left-padding row) outputs 0 and passes no gradient.
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    temperature = tempered(temperature)
    if temperature is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = TemperedSoftmax.apply(scores, temperature)
    probs = probs * has_key
    return (probs @ v).to(out_dtype)
