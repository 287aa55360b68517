"""An independent reference implementation of GIM on a Hugging Face model, for tests only.

Nothing here uses gim_fast. Every modification is written with plain autograd tricks on a materialised,
float64-friendly computation:

* attention: transformers' own boolean SDPA mask, scores materialised, ``P_ref = P.detach() + T·(softmax(S/T) −
  softmax(S/T).detach())`` — its value is P and its gradient is T·∇softmax(S/T), the GIM rule; ``O = P_ref V``
  so dV uses the true P;
* q/k/v, gate/up scaling: ``x·s + x.detach()·(1 − s)`` (value x, gradient s·dx);
* frozen norms: forward hooks returning the norm formula with the statistic detached.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "gim_reference_for_tests"


def _scaled(x, s):
    return x if s is None else x * s + x.detach() * (1.0 - s)


class _Config:
    temperature = None
    q_scale = k_scale = v_scale = None


_CFG = _Config()


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    q = _scaled(query, _CFG.q_scale)
    k = _scaled(key, _CFG.k_scale)
    v = _scaled(value, _CFG.v_scale)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = attention_mask  # [B, 1, S, S] bool from transformers' sdpa_mask (causal, window, padding)
    has_key = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, -1)
    if _CFG.temperature is not None:
        pt = torch.softmax(s / _CFG.temperature, -1)
        p = p.detach() + _CFG.temperature * (pt - pt.detach())
    p = p * has_key
    return (p @ v).transpose(1, 2).contiguous(), None


def _always_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, _reference_attention)
AttentionMaskInterface.register(NAME, _always_mask)


def _norm_hook(kind):
    """Value: the module's own output. Gradient: the norm formula with its statistic held constant.

    The statistic is computed as the module computes it (RMSNorms square and average in float32 even in a
    float64 model), so that the frozen constant is the very one the forward pass used."""
    def hook(module, args, output):
        (x,) = args
        if kind == "layer":
            mean = x.mean(-1, keepdim=True)
            sigma = ((x - mean).pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
            y = (x - mean) / sigma.detach() * module.weight + module.bias
        else:
            eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
            inv_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
            w = (1.0 + module.weight) if kind == "gemma" else module.weight
            y = x * inv_rms.detach() * w
        y = y.to(output.dtype)
        return output.detach() + (y - y.detach())
    return hook


def _grad_hook(scale):
    def hook(module, args, output):
        return _scaled(output, scale)
    return hook


@contextlib.contextmanager
def reference_gim(model, *, freeze_norm=True, softmax_temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5,
                  gate_scale=0.5, up_scale=0.5):
    """GIM on ``model`` through hooks and a reference attention function (float64 models)."""
    handles = []
    old_impl = model.config._attn_implementation
    _CFG.temperature, _CFG.q_scale, _CFG.k_scale, _CFG.v_scale = softmax_temperature, q_scale, k_scale, v_scale
    try:
        model.set_attn_implementation(NAME)
        for name, module in model.named_modules():
            cls = type(module).__name__
            if freeze_norm and cls.endswith("RMSNorm"):
                handles.append(module.register_forward_hook(_norm_hook("gemma" if "Gemma" in cls else "rms")))
            elif freeze_norm and isinstance(module, torch.nn.LayerNorm):
                handles.append(module.register_forward_hook(_norm_hook("layer")))
            if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
                if gate_scale is not None:
                    handles.append(module.gate_proj.register_forward_hook(_grad_hook(gate_scale)))
                if up_scale is not None:
                    handles.append(module.up_proj.register_forward_hook(_grad_hook(up_scale)))
        yield
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(old_impl)


def reference_scores(model, input_ids, baseline_token_id, target_token_id=None, target_position=-1,
                     attention_mask=None, **gim_settings):
    """Gradient × (input − baseline) of one row's target logit, under ``reference_gim`` (1-D input only)."""
    model.eval()
    embed = model.get_input_embeddings()
    ids = input_ids[None]
    e = embed(ids).detach().requires_grad_(True)
    eb = embed(torch.full_like(ids, baseline_token_id)).detach()
    with reference_gim(model, **gim_settings):
        logits = model(inputs_embeds=e, use_cache=False).logits[0, target_position]
        target = int(logits.argmax()) if target_token_id is None else target_token_id
        (grad,) = torch.autograd.grad(logits[target], e)
    return (grad * (e.detach() - eb)).sum(-1)[0], target
