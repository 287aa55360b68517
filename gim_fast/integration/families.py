"""The model families gim_fast knows, keyed by ``config.model_type``: which classes are the norms, the
attention and the gated MLP, and how each norm is computed. Adding a family is adding a row here."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """Where GIM hooks into one Hugging Face model family."""

    modeling_module: str           # e.g. "transformers.models.llama.modeling_llama"
    attention_class: str           # the module that calls the attention interface
    norm_class: str | None         # an RMSNorm class of the family; None: torch.nn.LayerNorm
    norm_kind: str                 # "rms" (Llama casting order), "rms_gemma" ((1 + w) in float32), "layer"
    norm_eps_attr: str             # the attribute holding epsilon
    gated_mlp_class: str | None    # MLP with gate_proj / up_proj (None: plain MLP, no gate/up scaling)

    def _cls(self, name: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.modeling_module), name)

    def attention_type(self) -> type[nn.Module]:
        return self._cls(self.attention_class)

    def norm_type(self) -> type[nn.Module]:
        return nn.LayerNorm if self.norm_class is None else self._cls(self.norm_class)

    def mlp_type(self) -> type[nn.Module] | None:
        return None if self.gated_mlp_class is None else self._cls(self.gated_mlp_class)


def _rms(name: str, prefix: str, kind: str = "rms", eps: str = "variance_epsilon") -> Family:
    return Family(f"transformers.models.{name}.modeling_{name}", f"{prefix}Attention", f"{prefix}RMSNorm",
                  kind, eps, f"{prefix}MLP")


FAMILIES: dict[str, Family] = {
    "llama": _rms("llama", "Llama"),
    "qwen2": _rms("qwen2", "Qwen2"),
    "qwen3": _rms("qwen3", "Qwen3"),
    "mistral": _rms("mistral", "Mistral"),
    "gemma2": _rms("gemma2", "Gemma2", "rms_gemma", "eps"),
    "gemma3_text": _rms("gemma3", "Gemma3", "rms_gemma", "eps"),
    "gpt2": Family("transformers.models.gpt2.modeling_gpt2", "GPT2Attention", None, "layer", "eps", None),
}


def family_of(model: nn.Module) -> Family:
    """The family of a Hugging Face model, or a ValueError naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} without a Hugging Face config"
        raise ValueError(f"gim_fast does not support {what}; supported model types: {supported}")
    return FAMILIES[model_type]
