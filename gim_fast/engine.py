"""The attribution engine: one forward and one input-gradient backward under GIM, for a padded batch.

Parameters are frozen for the duration (no weight gradients are ever computed), only the target positions'
logits are computed (``logits_to_keep``), and decoder layers are checkpointed when the memory estimate says the
activations would not fit — or refused before anything runs when even that would not fit
(``gim_fast.memory``). Everything is restored on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .integration import GIM, ModelIO, ModelState, checkpointed_layers, model_io, released_heap
from .memory import plan_checkpointing, plan_cotangents
from .backends import resolve_backend
from .settings import GIMSettings


@dataclass
class Attribution:
    """What one engine run computes, per row of the batch."""

    scores: torch.Tensor          # [B, S]: Σ_h ∂logit/∂e · (e − e_b); 0 at padded positions
    target_ids: torch.Tensor      # [B]
    target_logits: torch.Tensor   # [B], the raw logit being explained
    target_positions: torch.Tensor  # [B], absolute positions in the padded input
    checkpointing: bool = False   # whether decoder layers were checkpointed


def _check_not_inference(model) -> None:
    """Inference tensors can never take part in autograd: a model loaded or built under ``torch.inference_mode()``
    cannot be attributed (its weights would have to be copied)."""
    if any(p.is_inference() for p in model.parameters()):
        raise ValueError("the model's weights are inference tensors (the model was loaded or built inside "
                         "torch.inference_mode()), which autograd can never use, so no gradient-based attribution "
                         "can run on them; load the model outside torch.inference_mode() (torch.no_grad() is fine)")


def _with_autograd(fn):
    """Run ``fn`` with gradients on, whatever the caller's grad mode: attribution needs them, under
    ``torch.no_grad()`` and inside ``torch.inference_mode()`` alike. Tensors made under inference mode (the ids,
    the mask, ...) are copied to normal tensors first, since autograd cannot save inference tensors; the results
    are normal tensors too."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        _check_not_inference(model)
        with torch.inference_mode(False), torch.enable_grad():
            args = [a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a for a in args]
            return fn(model, *args, **kwargs)
    return run


@dataclass
class ForwardPass:
    """What the forward pass under GIM leaves for the backward: the input embeddings (the leaf the gradient is
    taken for), the baseline's embeddings, and the logits of the kept positions ``[B, K, V]``."""

    inputs: torch.Tensor
    baseline: torch.Tensor
    logits: torch.Tensor
    checkpointing: bool


def _memory_backend(io: ModelIO, settings: GIMSettings | None) -> str:
    """The attention backend the memory estimate assumes: the model's own eager attention, or GIM's backend."""
    if io.attention is not None:
        return io.attention
    return resolve_backend(settings.backend, io.weight.device, io.weight.dtype) if settings is not None else "torch"


@contextlib.contextmanager
def forward_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                 baseline_token_id: int, settings: GIMSettings | None, *, checkpointing: bool | str = "auto",
                 cotangents: int = 1):
    """The forward pass of an attribution, inside everything its backward needs (frozen parameters, eval mode,
    GIM, layer checkpointing when planned); the backward must run inside the ``with`` block.

    ``keep``: the sorted positions whose logits are computed. ``cotangents``: how many cotangents one backward
    pushes at once (the memory plan accounts for them).
    """
    io = model_io(model)
    batch, seq_len = input_ids.shape
    if io.hf_model is not None:
        use_checkpoints = plan_checkpointing(io.hf_model, seq_len, batch, backend=_memory_backend(io, settings),
                                             num_targets=len(keep), checkpointing=checkpointing,
                                             cotangents=cotangents)
    elif checkpointing is True:
        raise ValueError(f"checkpointing=True is not supported for a {type(model).__name__}; use 'auto' or False")
    else:
        use_checkpoints = False
    # Positions count real tokens only, so a left-padded row sees the same positions as when it is alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    with ModelState() as state:
        state.freeze_parameters(model)
        state.eval(model)
        if settings is not None:
            state.enter_context(GIM.from_settings(model, settings))
        if use_checkpoints:
            state.enter_context(checkpointed_layers(io.hf_model))
        if io.hf_model is not None:  # the memory estimate counts on it for layers on the CPU
            state.enter_context(released_heap(io.hf_model))
        with torch.no_grad():
            baseline = io.embed(torch.full_like(input_ids, baseline_token_id))
            inputs = io.embed(input_ids)
        inputs.requires_grad_(True)
        # logits: [B, K, V] on the head's device (which may differ under device_map)
        logits = io.forward(inputs, attention_mask, position_ids, keep, input_ids)
        yield ForwardPass(inputs, baseline, logits, use_checkpoints)


def gradient_x_input(grad: torch.Tensor, run: ForwardPass, attention_mask: torch.Tensor) -> torch.Tensor:
    """``Σ_h grad · (e − e_b)`` over the hidden dim, 0 at padded positions: grad ``[..., B, S, H]`` →
    ``[..., B, S]`` in float32 (float64 for float64 models)."""
    acc = torch.promote_types(grad.dtype, torch.float32)
    scores = (grad.to(acc) * (run.inputs.detach().to(acc) - run.baseline.to(acc))).sum(-1)
    return (scores * attention_mask.to(acc)).detach()


@_with_autograd
def attribute(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_positions: torch.Tensor,
              target_ids: torch.Tensor | None, baseline_token_id: int, settings: GIMSettings | None,
              *, checkpointing: bool | str = "auto") -> Attribution:
    """Gradient × (input − baseline) for a batch whose inputs were already validated.

    input_ids, attention_mask: ``[B, S]`` on the embedding's device; target_positions: ``[B]`` absolute positions
    of real tokens; target_ids: ``[B]`` or None for each row's top prediction. ``settings=None`` computes the
    plain gradient through the model's own attention (the cost floor of any gradient method).
    ``checkpointing``: ``"auto"`` (when the estimate says it is needed), True or False. Gradients are enabled
    inside, whatever the caller's grad mode (``torch.no_grad()``, ``torch.inference_mode()``).
    """
    batch = input_ids.shape[0]
    keep = torch.unique(target_positions)  # sorted; logits only where a row needs them
    with forward_pass(model, input_ids, attention_mask, keep, baseline_token_id, settings,
                      checkpointing=checkpointing) as run:
        rows = torch.arange(batch, device=run.logits.device)
        logits = run.logits[rows, torch.searchsorted(keep, target_positions).to(run.logits.device)]
        if target_ids is None:
            target_ids = logits.detach().argmax(-1)
        target_ids = target_ids.to(logits.device)
        target_logits = logits[rows, target_ids]
        (grad,) = torch.autograd.grad(target_logits.sum(), run.inputs)
    return Attribution(gradient_x_input(grad, run, attention_mask), target_ids, target_logits.detach().float(),
                       target_positions, run.checkpointing)


# explain_answer's automatic chunk: at most this many cotangents per backward pass (when the memory allows). On a
# CPU a bigger stack shares more attention work but its elementwise passes fall out of cache; on a GPU a bigger
# stack fills the device (docs/performance.md).
MAX_CHUNK = {"cpu": 8, "cuda": 32}


def _gradients_per_target(values: torch.Tensor, inputs: torch.Tensor, chunk: int):
    """∂values[:, m]/∂inputs for every m, ``chunk`` targets per backward pass: yields ``[c, B, S, H]``.

    Target m is the cotangent e_m on ``values [B, M]``; a chunk of them goes back as one stack through
    ``torch.func.vmap`` over ``torch.autograd.grad`` (GIM's custom Functions batch through
    ``gim_fast.ops.cotangents``), reusing the saved activations of the one forward pass.
    """
    batch, count = values.shape
    eye = torch.eye(count, dtype=values.dtype, device=values.device)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        retain = stop < count
        cotangents = eye[start:stop, None].expand(stop - start, batch, count)
        if stop - start == 1:
            yield torch.autograd.grad(values, inputs, cotangents[0], retain_graph=retain)[0][None]
        else:
            yield torch.func.vmap(lambda c: torch.autograd.grad(values, inputs, c, retain_graph=retain)[0])(cotangents)


@dataclass
class AnswerScores:
    """What one engine run over many targets per row computes."""

    scores: torch.Tensor           # [B, R, S]: one row per target (R = M), or their sum (R = 1)
    target_logits: torch.Tensor    # [B, M]: the raw logits of the targets
    target_logprobs: torch.Tensor  # [B, M]: their log-probabilities
    checkpointing: bool
    chunk: int                     # cotangents per backward pass


@_with_autograd
def attribute_targets(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_positions: torch.Tensor,
                      target_ids: torch.Tensor, target_mask: torch.Tensor, baseline_token_id: int,
                      settings: GIMSettings | None, *, target: str = "logit", total: bool = False,
                      chunk: int | None = None, checkpointing: bool | str = "auto") -> AnswerScores:
    """Gradient × (input − baseline) of M targets per row from one forward pass.

    target_positions, target_ids, target_mask: ``[B, M]`` (absolute positions of real tokens, token ids, and
    which targets are real). ``target``: ``"logit"`` (the raw logit) or ``"logprob"`` (log_softmax of the whole
    logits row). Row m of the result is the attribution of target m (0 after its position and for padded
    targets); ``total=True`` gives one row, the attribution of Σ_m target_m, from a single backward.

    The backward is linear in its cotangent: target m is the cotangent e_m on the ``[B, M]`` targets (the rows
    of a batch are independent, so one cotangent serves every row), and the M cotangents go back through the
    same saved activations, ``chunk`` at a time.
    """
    batch, count = target_ids.shape
    keep = torch.unique(target_positions[target_mask.bool()])
    io = model_io(model)
    if total:
        chunk = 1
    elif chunk is not None:
        chunk = min(chunk, count)
    elif io.hf_model is not None:
        chunk, checkpointing = plan_cotangents(io.hf_model, input_ids.shape[1], batch,
                                               backend=_memory_backend(io, settings), num_targets=len(keep),
                                               count=count, checkpointing=checkpointing,
                                               limit=MAX_CHUNK.get(io.weight.device.type, 8))
    else:
        chunk = count
    with forward_pass(model, input_ids, attention_mask, keep, baseline_token_id, settings,
                      checkpointing=checkpointing, cotangents=chunk) as run:
        device = run.logits.device
        where = torch.searchsorted(keep, target_positions.to(keep.device)).clamp(max=len(keep) - 1).to(device)
        logits = run.logits[torch.arange(batch, device=device)[:, None], where]          # [B, M, V]
        ids = target_ids.to(device)[..., None]
        valid = target_mask.to(device).bool()
        target_logits = logits.gather(-1, ids)[..., 0]
        acc = torch.promote_types(logits.dtype, torch.float32)
        target_logprobs = logits.to(acc).log_softmax(-1).gather(-1, ids)[..., 0]
        values = (target_logits if target == "logit" else target_logprobs) * valid  # [B, M]
        if total:
            (grad,) = torch.autograd.grad(values.sum(), run.inputs)
            scores = gradient_x_input(grad, run, attention_mask)[:, None]                # [B, 1, S]
        else:
            rows = [gradient_x_input(grad, run, attention_mask)
                    for grad in _gradients_per_target(values, run.inputs, chunk)]
            scores = torch.cat(rows).movedim(0, 1)                                         # [B, M, S]
            # row m sees only positions up to its own (exact zeros by causality; made explicit)
            columns = torch.arange(input_ids.shape[1], device=scores.device)
            seen = columns <= target_positions.to(scores.device)[..., None]
            scores = scores * (seen & valid.to(scores.device)[..., None])
    return AnswerScores(scores, target_logits.detach().float() * valid, target_logprobs.detach().float() * valid,
                        run.checkpointing, chunk)
