"""Model configs the benchmarks build with random weights: speed and memory do not depend on weight values.

The big ones are the real published configs (architecture numbers only); ``smollm2-135m-arch`` is SmolLM2's
architecture, for CPU runs that need no download and no conversion.
"""
from __future__ import annotations

import torch

CONFIGS = {
    "llama-3.1-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "qwen2.5-7b": ("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False)),
    "gemma-2-9b": ("gemma2", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, max_position_embeddings=131072, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6)),
    "smollm2-135m-arch": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True)),
}


def build(name: str, *, dtype=torch.bfloat16, device="cpu", layers: int | None = None,
          attn_implementation: str | None = None, **overrides):
    """A randomly initialised causal LM of the named config, in ``dtype`` on ``device``, in eval mode;
    ``overrides`` replace config entries (e.g. ``vocab_size`` for a smaller embedding table)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **kwargs)
    if attn_implementation is None:
        attn_implementation = "eager" if model_type == "gemma2" else "sdpa"  # no SDPA path for Gemma 2
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
