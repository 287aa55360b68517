"""The ``triton`` backend of ``gim_attention``: fused flash-attention kernels with the GIM backward.

The kernels and their launchers live in ``gim_fast.kernels.attention`` (see its docstring for the math, the grid
layout and the choice of how Δ_T = rowsum(dP ⊙ P_T) is obtained). This module is the thin autograd layer:
the forward keeps O, the row log-sum-exp and — when a backward will follow and the temperature is on — LSE_T and
O_T = P_T V; the backward launches the Δ_T, dK/dV and dQ kernels. Runs on CUDA, or on the CPU when
``TRITON_INTERPRET=1`` was set before triton was imported (slow: for tests).
"""
from __future__ import annotations

import torch

from ..kernels.attention import attention_backward, attention_forward
from ..settings import tempered
from .cotangents import backward_op, unbatched_forward_only


class TritonGIMAttention(torch.autograd.Function):
    """Fused attention: ordinary forward, GIM backward (temperature on dS, true P for dV, q/k/v factors).

    Returns ``(out, lse, lse_t, o_t)`` (``attention_forward``'s outputs; only ``out`` is differentiable).
    """

    vmap = staticmethod(unbatched_forward_only)

    @staticmethod
    def forward(q, k, v, scale, causal, sliding_window, softcap, key_padding_mask, temperature, q_scale, k_scale,
                v_scale, need_backward):
        temperature = tempered(temperature)
        return attention_forward(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
            key_padding_mask=key_padding_mask, temperature=temperature, need_backward=need_backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, sliding_window, softcap, key_padding_mask, temperature, q_scale, k_scale, v_scale, \
            need_backward = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        if need_backward:
            ctx.save_for_backward(q, k, v, *output, key_padding_mask)
            ctx.args = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
                            temperature=tempered(temperature),
                            q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    @staticmethod
    def backward(ctx, grad_out, *_):
        dq, dk, dv = backward_op(_TritonAttentionRule(ctx.args), grad_out, *ctx.saved_tensors)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


class _TritonAttentionRule:
    """The :class:`~gim_fast.ops.cotangents.CotangentRule` of the fused attention: the GIM backward for one
    cotangent ``[B,Hq,S,D]``, or for a stack ``[M,B,Hq,S,D]``: ``attention_backward`` takes either, and runs the M
    backward passes in one set of launches on a grid M times larger, Q, K, V and the forward statistics shared
    (indexed, never copied)."""

    grads = 1

    def __init__(self, args):
        self.args = args

    def one(self, grad_out, q, k, v, out, lse, lse_t, o_t, key_padding_mask):
        return attention_backward(grad_out, q, k, v, out, lse, lse_t, o_t, key_padding_mask=key_padding_mask,
                                  **self.args)

    many = one


def gim_attention_triton(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                         temperature, q_scale, k_scale, v_scale):
    """Fused GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype.

    Same keywords and semantics as ``gim_attention_chunked``: temperature None or 1.0 = off; q/k/v scale
    None = 1; key_padding_mask bool ``[B,S]`` (True = real token) or None.
    """
    need_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return TritonGIMAttention.apply(q, k, v, float(scale), bool(causal), sliding_window,
                                    None if softcap is None else float(softcap), key_padding_mask,
                                    temperature, q_scale, k_scale, v_scale, need_backward)[0]
