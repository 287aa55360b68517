"""``explain()``: GIM attributions of input tokens to one target logit, compatible with gim-explain's API.

score[i] = Σ_h (∂logit/∂e)[i, h] · (e − e_b)[i, h], with e the input embeddings, e_b the baseline token's
embedding at every position and the gradient taken under GIM. Every argument is checked before the model is
touched; a bad one raises ValueError/TypeError saying what was wrong and what is accepted.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .engine import attribute
from .integration import check_model, model_io
from .settings import DEFAULTS, GIMSettings


def _as_index(value, what: str) -> int:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point())):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value.item() if isinstance(value, torch.Tensor) else value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None


def as_id_tensor(input_ids, what: str = "input_ids") -> torch.Tensor:
    """``input_ids`` as an int64 tensor, 1-D or 2-D; lists of equal-length lists are accepted."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        rows = list(input_ids)
        if rows and all(isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in rows):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(
                    f"{what} rows have different lengths {sorted(lengths)}; pad them to one length and pass a mask "
                    "(1 = real token, 0 = padding), e.g. tokenizer(texts, padding=True) and its attention_mask")
        try:
            ids = torch.tensor(rows)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what} must be integer token ids (a tensor, a list, or a list of lists): {err}") from None
    else:
        raise TypeError(f"{what} must be a tensor or a list of token ids, got {type(input_ids).__name__}")
    if ids.numel() == 0:   # before the dtype: torch.tensor([]) is float32
        raise ValueError(f"{what} is empty (shape {tuple(ids.shape)}); give at least one token")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{what} must be [seq_len] or [batch, seq_len], got shape {tuple(ids.shape)}")
    return ids.long()


def as_mask(attention_mask, ids: torch.Tensor, what: str = "attention_mask", like: str = "input_ids") -> torch.Tensor:
    """The 0/1 mask of ``ids`` (all ones when None), checked: same shape, only 0 and 1, a real token per row."""
    if attention_mask is None:
        return torch.ones_like(ids, dtype=torch.long)
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else torch.as_tensor(attention_mask)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{what} must have the shape of {like} {tuple(ids.shape)}, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what} must hold only 0 (padding) and 1 (real token)")
    mask = mask.long()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError(f"every row of {what} needs at least one real token (a 1)")
    return mask


def check_vocabulary(ids: torch.Tensor, mask: torch.Tensor, vocab: int, what: str) -> None:
    """Every real (mask = 1) id in ``[0, vocab)``, or a ValueError naming the first few that are not."""
    bad = mask.bool() & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"{what} hold ids outside the vocabulary [0, {vocab}): {ids[bad][:5].tolist()}")


def resolve_baseline(baseline_token_id, tokenizer) -> int:
    """The baseline token: given, else the tokenizer's space token, pad token or unk token."""
    if baseline_token_id is not None:
        return _as_index(baseline_token_id, "baseline_token_id")
    if tokenizer is not None:
        try:
            space = tokenizer.encode(" ", add_special_tokens=False)
        except Exception:  # a tokenizer without encode(); fall through to its special tokens
            space = None
        if space:
            return int(space[0])
        for attr in ("pad_token_id", "unk_token_id"):
            if getattr(tokenizer, attr, None) is not None:
                return int(getattr(tokenizer, attr))
    raise ValueError(
        "no baseline token: pass baseline_token_id=..., or a tokenizer whose ' ' encodes to a token or that has a "
        "pad_token_id or unk_token_id")


def _per_row(value, batch: int, what: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dim() > 0 or isinstance(value, (list, tuple)):
        values = [_as_index(v, what) for v in value]
        if len(values) != batch:
            raise ValueError(f"{what} has {len(values)} entries for a batch of {batch}; give one per row or a single int")
        return values
    return [_as_index(value, what)] * batch


def check_call(model, settings: GIMSettings, checkpointing) -> None:
    """The model and ``checkpointing`` checked before anything runs (``settings`` were checked when built)."""
    check_model(model)
    if checkpointing not in ("auto", True, False):
        raise ValueError(f"checkpointing must be 'auto', True or False, got {checkpointing!r}")


def explain(model, input_ids, *, target_token_id=None, target_position=-1, baseline_token_id=None, tokenizer=None,
            attention_mask=None, freeze_norm=DEFAULTS.freeze_norm,
            softmax_temperature=DEFAULTS.softmax_temperature, q_scale=DEFAULTS.q_scale, k_scale=DEFAULTS.k_scale,
            v_scale=DEFAULTS.v_scale, gate_scale=DEFAULTS.gate_scale, up_scale=DEFAULTS.up_scale,
            backend=DEFAULTS.backend, checkpointing="auto") -> torch.Tensor:
    """GIM attribution of each input token to one target logit.

    Args:
        model: a Hugging Face causal LM of a supported family (``gim_fast.integration.FAMILIES``), or a
            TransformerLens model: a ``TransformerBridge`` over such a model, or a legacy ``HookedTransformer``.
        input_ids: ``[S]`` or ``[B, S]`` token ids (tensor or lists).
        target_token_id: the token whose logit is explained; default each row's top prediction. An int, or one
            per row.
        target_position: the position whose logit is explained, counted over each row's real tokens like a
            Python index (default -1: the last real token). An int, or one per row.
        baseline_token_id / tokenizer: the baseline token (default: the tokenizer's " " token, else its pad
            token, else its unk token).
        attention_mask: ``[B, S]`` with 1 for real tokens and 0 for padding (left or right); each row gives
            the same scores as when attributed alone.
        freeze_norm, softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale: GIM settings
            (``gim_fast.GIMSettings``); ``None`` turns one off.
        backend: ``"auto"``, ``"torch"``, ``"eager"`` or ``"triton"`` (see ``gim_fast.ops``).
        checkpointing: ``"auto"`` checkpoints decoder layers only when the memory estimate says the activations
            would not fit otherwise; True/False force it. A request that cannot fit even with checkpointing
            raises ``gim_fast.InsufficientMemoryError`` before anything runs (see ``gim_fast.estimate_memory``).

    Returns:
        Scores ``[S]`` for 1-D input, ``[B, S]`` for 2-D (0 at padded positions), float32 (float64 for a
        float64 model), on the model's device.
    """
    settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
                           k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
                           backend=backend)
    return explain_with(model, input_ids, settings, target_token_id=target_token_id,
                        target_position=target_position, baseline_token_id=baseline_token_id, tokenizer=tokenizer,
                        attention_mask=attention_mask, checkpointing=checkpointing)


def explain_with(model, input_ids, settings: GIMSettings, *, target_token_id=None, target_position=-1,
                 baseline_token_id=None, tokenizer=None, attention_mask=None, checkpointing="auto") -> torch.Tensor:
    """:func:`explain` with the GIM settings as one :class:`~gim_fast.settings.GIMSettings`."""
    check_call(model, settings, checkpointing)
    ids = as_id_tensor(input_ids)
    squeeze = ids.dim() == 1
    mask = as_mask(attention_mask, ids)
    if squeeze:
        ids, mask = ids[None], mask[None]
    batch = ids.shape[0]

    io = model_io(model)
    vocab_in = io.vocab_in
    check_vocabulary(ids, mask, vocab_in, "input_ids")
    vocab_out = io.vocab_out

    lengths = mask.sum(-1).tolist()
    positions = _per_row(target_position, batch, "target_position")
    absolute = []
    for row, (p, n) in enumerate(zip(positions, lengths)):
        if not -n <= p < n:
            raise ValueError(f"target_position {p} is out of range for row {row} with {n} real tokens; "
                             f"accepted: {-n} … {n - 1}")
        absolute.append(int(mask[row].nonzero()[p]))
    targets = _per_row(target_token_id, batch, "target_token_id")
    if targets is not None:
        for t in targets:
            if not 0 <= t < vocab_out:
                raise ValueError(f"target_token_id {t} is outside the vocabulary [0, {vocab_out})")
    baseline = resolve_baseline(baseline_token_id, tokenizer)
    if not 0 <= baseline < vocab_in:
        raise ValueError(f"baseline_token_id {baseline} is outside the vocabulary [0, {vocab_in})")

    device = io.weight.device
    # Padded positions may hold any id (e.g. -100 or an out-of-range pad): embed a valid one there.
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, baseline))
    result = attribute(
        model, ids.to(device), mask.to(device), torch.tensor(absolute, device=device),
        None if targets is None else torch.tensor(targets, device=device), baseline, settings,
        checkpointing=checkpointing)
    return result.scores[0] if squeeze else result.scores
