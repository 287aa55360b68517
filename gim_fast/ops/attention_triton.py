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


def _temperature_on(temperature) -> bool:
    return temperature is not None and float(temperature) != 1.0


class TritonGIMAttention(torch.autograd.Function):
    """Fused attention: ordinary forward, GIM backward (temperature on dS, true P for dV, q/k/v factors)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, sliding_window, softcap, key_padding_mask,
                temperature, q_scale, k_scale, v_scale):
        need_backward = any(ctx.needs_input_grad[:3])
        temperature = float(temperature) if _temperature_on(temperature) else None
        out, lse, lse_t, o_t = attention_forward(
            q, k, v, scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
            key_padding_mask=key_padding_mask, temperature=temperature, need_backward=need_backward)
        if need_backward:
            ctx.save_for_backward(q, k, v, out, lse, lse_t, o_t, key_padding_mask)
            ctx.args = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
                            temperature=temperature, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, lse_t, o_t, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, lse_t, o_t,
                                        key_padding_mask=key_padding_mask, **ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def gim_attention_triton(q, k, v, *, scale, causal, sliding_window, softcap, key_padding_mask,
                         temperature, q_scale, k_scale, v_scale):
    """Fused GIM attention. q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → ``[B,Hq,S,D]`` in q's dtype.

    Same keywords and semantics as ``gim_attention_chunked``: temperature None or 1.0 = off; q/k/v scale
    None = 1; key_padding_mask bool ``[B,S]`` (True = real token) or None.
    """
    return TritonGIMAttention.apply(q, k, v, float(scale), bool(causal), sliding_window,
                                    None if softcap is None else float(softcap), key_padding_mask,
                                    temperature, q_scale, k_scale, v_scale)
