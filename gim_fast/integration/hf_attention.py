"""gim_fast's attention function and mask function, registered with transformers' interfaces.

transformers calls ``gim_attention_forward(module, q, k, v, attention_mask, scaling=..., sliding_window=...,
softcap=...)`` from each attention module once the model's attention implementation is ``"gim_fast"``. The
GIM settings of the active context are looked up by attention module, so two models under two different
``GIM`` contexts never see each other's settings.

The mask function hands the attention function the 2-D key-padding mask (or ``None``) instead of an S×S
mask: causality and the sliding window come from structure (``is_causal``, the ``sliding_window`` kwarg).
Without a registered mask function transformers would silently pass ``attention_mask=None``.
"""
from __future__ import annotations

import weakref

import torch

from .. import ops
from ..settings import GIMSettings

ATTENTION_NAME = "gim_fast"  # no "/" or ":": transformers reads those as hub kernel names

# attention module -> the settings of the GIM context it is in
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, GIMSettings]" = weakref.WeakKeyDictionary()


def gim_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
    """The key-padding mask ``[B, kv_length]`` (True = real token), or None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def gim_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          sliding_window=None, softcap=None, **kwargs):
    """q ``[B,Hq,S,D]``, k/v ``[B,Hkv,S,D]`` → (``[B,S,Hq,D]`` contiguous, None)."""
    settings = _ACTIVE.get(module)
    if settings is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attention {ATTENTION_NAME!r} outside a gim_fast.GIM context; "
            "wrap the forward pass in `with gim_fast.GIM(model):`")
    if dropout:
        raise ValueError("GIM attention has no dropout; put the model in eval mode (GIM does this on entry)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"gim_fast expects a 2-D attention mask [batch, seq] (1 = real token), got a {attention_mask.dim()}-D "
            "mask; custom 4-D masks are not supported")
    out = ops.gim_attention(
        query, key, value, scale=scaling, causal=True, sliding_window=sliding_window, softcap=softcap,
        key_padding_mask=attention_mask, temperature=settings.softmax_temperature,
        q_scale=settings.q_scale, k_scale=settings.k_scale, v_scale=settings.v_scale, backend=settings.backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention and mask functions under ``ATTENTION_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, gim_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, gim_mask)


def activate(module: torch.nn.Module, settings: GIMSettings) -> None:
    _ACTIVE[module] = settings


def deactivate(module: torch.nn.Module) -> None:
    _ACTIVE.pop(module, None)


def is_active(module: torch.nn.Module) -> bool:
    return module in _ACTIVE
