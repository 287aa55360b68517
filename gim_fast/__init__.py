"""gim_fast: fast, faithful GIM attributions for Hugging Face language models."""
from . import ops
from .settings import GIMSettings

__version__ = "0.1.0"
__all__ = ["ops", "GIMSettings", "__version__"]
