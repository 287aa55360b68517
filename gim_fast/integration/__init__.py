"""Model glue: applies GIM to Hugging Face models through transformers' own interfaces. Knows nothing of Triton."""
from .families import FAMILIES, Family, family_of
from .gim import GIM, check_model

__all__ = ["GIM", "check_model", "FAMILIES", "Family", "family_of"]
