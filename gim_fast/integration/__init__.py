"""Model glue: applies GIM to Hugging Face models through transformers' own interfaces, and to TransformerLens
models through their hook points (``tlens``; TransformerLens is imported only when such a model is passed).
Knows nothing of Triton."""
from . import tlens
from .families import FAMILIES, Family, family_of
from .checkpointing import checkpointed_layers, decoder_layers
from .gim import GIM, check_model, eval_mode
from .model_io import ModelIO, hf_model_io, model_io

__all__ = ["GIM", "check_model", "eval_mode", "checkpointed_layers", "decoder_layers", "FAMILIES", "Family",
           "family_of", "tlens", "ModelIO", "hf_model_io", "model_io"]
