"""Model glue: applies GIM to Hugging Face models through transformers' own interfaces. Knows nothing of Triton."""
from .families import FAMILIES, Family, family_of
from .checkpointing import checkpointed_layers, decoder_layers
from .gim import GIM, check_model, eval_mode

__all__ = ["GIM", "check_model", "eval_mode", "checkpointed_layers", "decoder_layers", "FAMILIES", "Family",
           "family_of"]
