"""gim_fast: fast, faithful GIM (Gradient Interaction Modifications) attributions for Hugging Face LLMs.

    scores = gim_fast.explain(model, input_ids, tokenizer=tokenizer)
    result = gim_fast.explain_answer(model, prompt_ids, answer_ids)   # every answer token × every token
    with gim_fast.GIM(model): ...   # any gradient method, with GIM's backward
    for row in gim_fast.attribute_dataset("prompts.jsonl", out="runs/x"): ...   # a whole data set
"""
from . import ops
from .answers import AnswerAttribution, explain_answer, explain_generation
from .explain import explain
from .integration import GIM
from .jobs import attribute_dataset
from .memory import InsufficientMemoryError, estimate_memory
from .settings import GIMSettings

__version__ = "0.1.0"
__all__ = ["explain", "explain_answer", "explain_generation", "AnswerAttribution", "GIM", "ops", "GIMSettings",
           "attribute_dataset", "estimate_memory", "InsufficientMemoryError", "__version__"]
