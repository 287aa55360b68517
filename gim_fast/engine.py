"""The attribution engine: one forward and one input-gradient backward under GIM, for a padded batch.

Parameters are frozen for the duration (no weight gradients are ever computed), only the target positions'
logits are computed (``logits_to_keep``), and decoder layers are checkpointed when the memory estimate says the
activations would not fit — or refused before anything runs when even that would not fit
(``gim_fast.memory``). Everything is restored on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .integration import GIM, checkpointed_layers, eval_mode
# ModelIO and hf_model_io live in the integration layer; still importable from here, where they used to be
from .integration.model_io import ModelIO, hf_model_io, model_io  # noqa: F401
from .memory import plan_checkpointing
from .settings import GIMSettings, resolve_backend


@dataclass
class Attribution:
    """What one engine run computes, per row of the batch."""

    scores: torch.Tensor          # [B, S]: Σ_h ∂logit/∂e · (e − e_b); 0 at padded positions
    target_ids: torch.Tensor      # [B]
    target_logits: torch.Tensor   # [B], the raw logit being explained
    target_positions: torch.Tensor  # [B], absolute positions in the padded input
    checkpointing: bool = False   # whether decoder layers were checkpointed


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module):
    """``requires_grad_(False)`` on every parameter for the duration; the flags are restored exactly."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def attribute(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_positions: torch.Tensor,
              target_ids: torch.Tensor | None, baseline_token_id: int, settings: GIMSettings | None,
              *, checkpointing: bool | str = "auto") -> Attribution:
    """Gradient × (input − baseline) for a batch whose inputs were already validated.

    input_ids, attention_mask: ``[B, S]`` on the embedding's device; target_positions: ``[B]`` absolute positions
    of real tokens; target_ids: ``[B]`` or None for each row's top prediction. ``settings=None`` computes the
    plain gradient through the model's own attention (the cost floor of any gradient method).
    ``checkpointing``: ``"auto"`` (when the estimate says it is needed), True or False.
    """
    io = model_io(model)
    embed = io.embed
    batch, seq_len = input_ids.shape
    keep = torch.unique(target_positions)  # sorted; logits only where a row needs them
    dtype = io.weight.dtype
    backend = resolve_backend(settings.backend, input_ids.device, dtype) if settings is not None else "torch"
    if io.hf_model is not None:
        use_checkpoints = plan_checkpointing(io.hf_model, seq_len, batch, backend=io.attention or backend,
                                             num_targets=len(keep), checkpointing=checkpointing)
    elif checkpointing is True:
        raise ValueError(f"checkpointing=True is not supported for a {type(model).__name__}; use 'auto' or False")
    else:
        use_checkpoints = False
    # Positions count real tokens only, so a left-padded row sees the same positions as when it is alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        stack.enter_context(eval_mode(model))
        if settings is not None:
            stack.enter_context(GIM.from_settings(model, settings))
        if use_checkpoints:
            stack.enter_context(checkpointed_layers(io.hf_model))
        with torch.no_grad():
            baseline = embed(torch.full_like(input_ids, baseline_token_id))
            inputs = embed(input_ids)
        inputs.requires_grad_(True)
        logits = io.forward(inputs, attention_mask, position_ids, keep, input_ids)
        # logits: [B, K, V] on the head's device (which may differ under device_map)
        rows = torch.arange(batch, device=logits.device)
        logits = logits[rows, torch.searchsorted(keep, target_positions).to(logits.device)]
        if target_ids is None:
            target_ids = logits.detach().argmax(-1)
        target_ids = target_ids.to(logits.device)
        target_logits = logits[rows, target_ids]
        (grad,) = torch.autograd.grad(target_logits.sum(), inputs)

    acc = torch.promote_types(grad.dtype, torch.float32)
    scores = (grad.to(acc) * (inputs.detach().to(acc) - baseline.to(acc))).sum(-1)
    scores = scores * attention_mask.to(acc)
    return Attribution(scores.detach(), target_ids, target_logits.detach().float(), target_positions,
                       use_checkpoints)
