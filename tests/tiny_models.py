"""Tiny random models of every supported family, built from configs (no hub). Shapes are small but odd:
head dim 16 with GQA, sliding windows shorter than the test sequences, Gemma 2 soft-capping that matters."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 101
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2")

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0,
               initializer_range=0.1)  # larger than the default 0.02: attention far from uniform


def config_of(family: str, **overrides):
    if family == "llama":
        cfg = tf.LlamaConfig(**_COMMON)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"])
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**_COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                             layer_types=["full_attention", "sliding_attention"])
    elif family == "mistral":
        cfg = tf.MistralConfig(**_COMMON, sliding_window=7)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**_COMMON, query_pre_attn_scalar=16, sliding_window=5, attn_logit_softcapping=1.5,
                              final_logit_softcapping=7.0, layer_types=["sliding_attention", "full_attention"])
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**_COMMON, query_pre_attn_scalar=16, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"])
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=3, n_positions=256, pad_token_id=0,
                            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                            initializer_range=0.1)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _perturb_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random norm weights: the initial ones (1, or 0 for Gemma's 1 + w) would hide casting and offset bugs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A random tiny causal LM of ``family``; left in training mode, as ``from_config`` leaves it.

    Attention defaults to transformers' own default: SDPA, or eager for Gemma 2 (which has no SDPA path)."""
    if attn_implementation is None:
        attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    cls = tf.GPT2LMHeadModel if family == "gpt2" else (
        tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM)
    cfg = config_of(family, **overrides)
    if cls is tf.AutoModelForCausalLM:
        model = cls.from_config(cfg, attn_implementation=attn_implementation)
    else:
        model = cls._from_config(cfg, attn_implementation=attn_implementation)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype)


def random_ids(length: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (length,) if batch is None else (batch, length)
    return torch.randint(1, VOCAB, shape, generator=g)
