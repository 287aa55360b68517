"""Model glue: applies GIM to Hugging Face models through transformers' own interfaces, and to TransformerLens
models through their hook points (``tlens``; TransformerLens is imported only when such a model is passed).
Every change to a model is made through ``state.ModelState`` and undone on exit. Knows nothing of Triton."""
from . import tlens
from .checkpointing import checkpointed_layers, decoder_layers
from .families import FAMILIES, Family, family_of
from .gim import GIM, check_model
from .heap import can_release_heap, released_heap
from .hf_io import ModelIO, hf_model_io
from .model_io import model_io
from .state import ModelState, eval_mode, frozen_parameters

__all__ = ["GIM", "check_model", "eval_mode", "frozen_parameters", "ModelState", "checkpointed_layers",
           "decoder_layers", "released_heap", "can_release_heap", "FAMILIES", "Family", "family_of", "tlens",
           "ModelIO", "hf_model_io", "model_io"]
