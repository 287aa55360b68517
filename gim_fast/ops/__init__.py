"""gim_fast.ops: the GIM operations on plain tensors, independent of any model.

``gim_attention``     attention whose backward follows the GIM rule (temperature, q/k/v scales)
``frozen_rms_norm``   RMSNorm whose backward treats the RMS as a constant
``frozen_layer_norm`` LayerNorm whose backward treats the standard deviation as a constant
``gated_product``     a gated MLP's act(g) · u, with a backward that shares its factors across stacked cotangents

Each takes ``backend=``: ``"eager"`` (materialised, the reference), ``"torch"`` (row-chunked, O(S) memory,
any device), ``"triton"`` (fused kernels, CUDA) or ``"auto"`` (``triton`` on CUDA, ``torch`` elsewhere, and
``torch`` too when a Triton attention kernel does not compile for the GPU: one warning names the architecture and
the compiler's error). Results do not depend on the backend beyond floating-point rounding.
"""
from __future__ import annotations

import math

import torch

from ..backends import resolve_backend
from ..settings import check_backend, check_scale, check_temperature, tempered
from .attention_chunked import gim_attention_chunked
from .attention_eager import gim_attention_eager
from .gated import gated_product
from .norms import FrozenLayerNorm, FrozenRMSNorm, frozen_layer_norm_eager, frozen_rms_norm_eager

__all__ = ["gim_attention", "frozen_rms_norm", "frozen_layer_norm", "gated_product"]


def _check_attention_inputs(q, k, v, key_padding_mask, sliding_window, softcap, causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gim_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"gim_attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"gim_attention: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"gim_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"gim_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(
            f"gim_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, sequence length "
            "and head dim (self-attention over the whole sequence; no KV cache)")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"gim_attention: query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("gim_attention: key_padding_mask must be a bool tensor [batch, seq] (True = real token)")
        if tuple(key_padding_mask.shape) != (b, s):
            raise ValueError(f"gim_attention: key_padding_mask must have shape {(b, s)}, got {tuple(key_padding_mask.shape)}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"gim_attention: sliding_window must be a positive int or None, got {sliding_window!r}")
        if not causal:
            raise ValueError("gim_attention: sliding_window is only defined for causal attention")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"gim_attention: softcap must be a positive number or None, got {softcap!r}")


def gim_attention(q, k, v, *, scale=None, causal=True, sliding_window=None, softcap=None, key_padding_mask=None,
                  temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5, backend="auto"):
    """Attention whose forward is ordinary and whose backward follows GIM.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA, never repeated).
        scale: score scale, default ``1/sqrt(D)``.
        causal: key j visible to query i only when ``j <= i``.
        sliding_window: ``w`` keeps keys ``i - w < j <= i``.
        softcap: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).
        key_padding_mask: bool ``[B, S]``, True for real tokens; padded keys are never attended to, and a query
            with no visible key outputs 0.
        temperature: GIM softmax temperature T (``None`` = plain gradient). With P = softmax(S) and
            P_T = softmax(S/T): ``dS = P_T ⊙ (dP − rowsum(dP ⊙ P_T))``; ``dV = Pᵀ dO`` keeps the true P.
        q_scale, k_scale, v_scale: factors on dq, dk, dv (``None`` = 1).
        backend: ``"auto"``, ``"eager"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, Hq, S, D]`` in q's dtype; the softmax math runs in float32 (float64 for float64 inputs).
    """
    _check_attention_inputs(q, k, v, key_padding_mask, sliding_window, softcap, causal)
    temperature = tempered(check_temperature(temperature))
    q_scale, k_scale, v_scale = (check_scale(n, s) for n, s in
                                 (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = dict(scale=float(scale), causal=bool(causal), sliding_window=sliding_window,
                softcap=None if softcap is None else float(softcap), key_padding_mask=key_padding_mask,
                temperature=temperature, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)
    requested = check_backend(backend)
    backend = resolve_backend(requested, q.device, q.dtype)
    if backend == "eager":
        return gim_attention_eager(q, k, v, **args)
    if backend == "triton":
        from .attention_triton import gim_attention_triton  # imports triton: only when asked for

        # "auto": a kernel that does not compile for this GPU runs the torch backend instead (one warning)
        return gim_attention_triton(q, k, v, **args, fallback=requested == "auto")
    return gim_attention_chunked(q, k, v, **args)


def _check_norm_inputs(fn, x, weight, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor")
    if weight is not None and (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],)):
        raise ValueError(f"{fn}: weight must be a tensor of shape ({x.shape[-1]},) or None")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{fn}: eps must be a non-negative number, got {eps!r}")


def frozen_rms_norm(x, weight, eps, *, offset=0.0, backend="auto"):
    """RMSNorm with the RMS frozen in the backward: ``dx = dy · (offset + w) / rms``.

    The forward is bit-identical to the Hugging Face module: ``offset=0`` follows Llama/Qwen/Mistral
    (normalise in float32, cast to x's dtype, then multiply by w); ``offset=1.0`` follows Gemma
    (multiply by ``1 + w`` in float32, then cast).
    """
    _check_norm_inputs("frozen_rms_norm", x, weight, eps)
    backend = resolve_backend(check_backend(backend), x.device, x.dtype)
    if backend == "eager":
        return frozen_rms_norm_eager(x, weight, float(eps), float(offset))
    if backend == "triton":
        from .norm_triton import frozen_rms_norm_triton

        # r from torch's own reduction, so the forward stays the module's bit for bit (see norm_triton)
        return frozen_rms_norm_triton(x, weight, float(eps), float(offset), exact_rstd=True)
    return FrozenRMSNorm.apply(x, weight, float(eps), float(offset))[0]


def frozen_layer_norm(x, weight, bias, eps, *, backend="auto"):
    """LayerNorm over the last dim with σ frozen in the backward: ``dx = (g − mean(g)) / σ``, ``g = dy · w``.

    The forward is ``torch.nn.functional.layer_norm``'s, bit for bit.
    """
    _check_norm_inputs("frozen_layer_norm", x, weight, eps)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[-1],)):
        raise ValueError(f"frozen_layer_norm: bias must be a tensor of shape ({x.shape[-1]},) or None")
    backend = resolve_backend(check_backend(backend), x.device, x.dtype)
    if backend == "eager":
        return frozen_layer_norm_eager(x, weight, bias, float(eps))
    if backend == "triton":
        from .norm_triton import frozen_layer_norm_triton

        return frozen_layer_norm_triton(x, weight, bias, float(eps))
    return FrozenLayerNorm.apply(x, weight, bias, float(eps))[0]
