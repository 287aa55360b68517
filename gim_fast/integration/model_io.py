"""``model_io``: the engine's view of any supported model (see ``gim_fast.integration.hf_io.ModelIO``)."""
from __future__ import annotations

from . import tlens
from .hf_io import ModelIO, hf_model_io

__all__ = ["model_io"]


def model_io(model) -> ModelIO:
    """The engine's view of ``model``: a Hugging Face model's own, or a TransformerLens model's (``tlens``)."""
    return tlens.model_io(model) if tlens.is_transformer_lens_model(model) else hf_model_io(model)
