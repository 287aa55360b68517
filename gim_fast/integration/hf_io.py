"""How the engine talks to a model: ``ModelIO`` (embed the ids, run the forward from input embeddings to the
logits of the kept positions), and the one of a Hugging Face model (``hf_model_io``). TransformerLens models get
theirs from ``gim_fast.integration.tlens``; ``gim_fast.integration.model_io`` picks the right one."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ModelIO:
    """How the engine talks to a model: what embeds the ids, and a forward from input embeddings to the logits
    of the kept positions. Hugging Face models use their own embedding and forward; TransformerLens models get
    theirs from ``gim_fast.integration.tlens.model_io``."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # ids [B, S] -> the input embeddings e [B, S, H]
    weight: torch.Tensor                           # the embedding matrix (its device and dtype)
    vocab_in: int
    vocab_out: int
    # (inputs_embeds [B,S,H], attention_mask [B,S], position_ids [B,S], keep [K], input_ids [B,S]) -> [B, K, V]
    forward: Callable[..., torch.Tensor]
    hf_model: torch.nn.Module | None = None        # memory estimate and layer checkpointing (None: neither)
    attention: str | None = None                   # "eager": the model materialises its S×S attention itself


def hf_model_io(model, *, attention: str | None = None) -> ModelIO:
    """A Hugging Face causal LM's own input embedding and forward (``logits_to_keep``, no cache)."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()

    def forward(inputs, attention_mask, position_ids, keep, input_ids):
        return model(inputs_embeds=inputs, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, logits_to_keep=keep).logits

    return ModelIO(embed=embed, weight=embed.weight, vocab_in=embed.num_embeddings,
                   vocab_out=getattr(head, "out_features", None) or model.config.vocab_size, forward=forward,
                   hf_model=model, attention=attention)


__all__ = ["ModelIO", "hf_model_io"]
