"""Faithfulness metrics of a token attribution, exactly as the GIM paper's evaluation code defines them.

For one sequence x of n tokens, a target token t and a position p (default the last), let f(x) be the raw logit of
t at p, computed in float32, and let x[S → b] be x with the positions in S replaced by the baseline token b. Only
the positions 1 … n−2 are ever replaced (the first and the last are left alone); call them the m = max(n − 2, 0)
candidates, and rank them by attribution score, highest first (ties: the earlier position first).

**Comprehensiveness** (higher is better): remove the most important tokens first and see the logit fall.
With R_k the top k of the ranking and K = 50,

    drop_k = f(x) − f(x[R_k → b])       for k = 1 … min(K, m),   drop_k = 0 for k > m
    comprehensiveness = (Σ_{k=1..K} drop_k / K) / f(x)

**Sufficiency** (lower is better): keep only the most important tokens and see the logit hold.
With L_r the int(r · m) lowest-ranked candidates (floor, Python's ``int``) and ratios r ∈ {0.5, 0.8, 0.9, 0.95, 0.99},

    sufficiency = (mean_r [f(x) − f(x[L_r → b])]) / f(x)

(a ratio with int(r · m) = 0 replaces nothing: drop 0). Both are divided by f(x) as the paper's code does, so a
target with a negative logit flips their sign; the evaluation only uses targets the model predicts.

``measure="prob"`` computes the same two numbers with the target's softmax probability in place of the raw logit
(the ERASER-style variant: a drop as a fraction of the unperturbed probability). It is not the paper's definition,
but it is immune to what shifts every logit at once: on short prompts, replacing tokens by a blank baseline token
can raise all logits together, the target's included, while its probability falls.

All the perturbed copies of a sequence have its length, so they are scored in batched forwards without padding
(``batch_rows`` at a time), computing the logits of the target position only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..examples import DEFAULT_BATCH_ROWS

__all__ = ["comprehensiveness", "sufficiency", "faithfulness", "COMPREHENSIVENESS_STEPS", "SUFFICIENCY_RATIOS",
           "MEASURES", "ranking", "comprehensiveness_sets", "sufficiency_sets", "target_logits", "target_values",
           "combine"]

COMPREHENSIVENESS_STEPS = 50
SUFFICIENCY_RATIOS = (0.5, 0.8, 0.9, 0.95, 0.99)


def _ids_1d(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence [seq_len] (or [1, seq_len]), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError("input_ids is empty")
    return ids.long()


def _scores_1d(scores, n: int) -> torch.Tensor:
    s = torch.as_tensor(scores).detach()
    if s.dim() == 2 and s.shape[0] == 1:
        s = s[0]
    if tuple(s.shape) != (n,):
        raise ValueError(f"scores must have one value per token ({n}), got shape {tuple(s.shape)}")
    return s.float().cpu()


def ranking(scores) -> list[int]:
    """Positions 1 … n−2 by score, highest first; equal scores keep position order (a stable sort)."""
    s = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if s.numel() <= 2:
        return []
    order = torch.argsort(s[1:-1], descending=True, stable=True) + 1
    return order.tolist()


def comprehensiveness_sets(scores, steps: int = COMPREHENSIVENESS_STEPS) -> list[tuple[int, ...]]:
    """The positions replaced at step k = 1 … min(steps, m): the top k of the ranking (cumulative)."""
    order = ranking(scores)
    return [tuple(order[:k]) for k in range(1, min(steps, len(order)) + 1)]


def sufficiency_sets(scores, ratios: Sequence[float] = SUFFICIENCY_RATIOS) -> list[tuple[int, ...]]:
    """For each ratio r, the int(r · m) least important candidates (the tail of the ranking, lowest first)."""
    least_first = ranking(scores)[::-1]
    m = len(least_first)
    return [tuple(least_first[:int(r * m)]) for r in ratios]


def _position(target_position: int, n: int) -> int:
    if not -n <= target_position < n:
        raise ValueError(f"target_position {target_position} is out of range for {n} tokens")
    return target_position % n


def _model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


MEASURES = ("logit", "prob")


@torch.no_grad()
def target_values(model, rows: torch.Tensor, target_token_ids, target_position: int = -1,
                  batch_rows: int = DEFAULT_BATCH_ROWS) -> dict[str, torch.Tensor]:
    """``{"logit": [R], "prob": [R]}``, float32: row r's raw logit of ``target_token_ids[r]`` (an int: the same for
    all) at ``target_position``, and its softmax probability. ``rows`` is ``[R, S]`` (no padding), scored
    ``batch_rows`` rows per forward with the logits of that one position only."""
    rows = torch.as_tensor(rows).long()
    count, n = rows.shape
    targets = torch.as_tensor(target_token_ids).long().reshape(-1).expand(count)
    keep = torch.tensor([_position(target_position, n)])
    device = _model_device(model)
    logits_out, probs_out = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, batch_rows):
            chunk = rows[start:start + batch_rows].to(device)
            logits = model(input_ids=chunk, use_cache=False, logits_to_keep=keep.to(device)).logits[:, -1].float()
            t = targets[start:start + batch_rows].to(logits.device)[:, None]
            logits_out.append(logits.gather(1, t)[:, 0].cpu())
            probs_out.append(torch.softmax(logits, -1).gather(1, t)[:, 0].cpu())
    finally:
        model.train(was_training)
    empty = torch.zeros(0)
    return {"logit": torch.cat(logits_out) if logits_out else empty,
            "prob": torch.cat(probs_out) if probs_out else empty}


def target_logits(model, rows: torch.Tensor, target_token_ids, target_position: int = -1,
                  batch_rows: int = DEFAULT_BATCH_ROWS) -> torch.Tensor:
    """float32 raw logits ``[R]`` of the targets at ``target_position`` (see :func:`target_values`)."""
    return target_values(model, rows, target_token_ids, target_position, batch_rows)["logit"]


def _check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    return measure


def _replace(ids: torch.Tensor, sets: Sequence[tuple[int, ...]], baseline: int) -> torch.Tensor:
    rows = ids.repeat(len(sets), 1)
    for r, positions in enumerate(sets):
        if positions:
            rows[r, list(positions)] = baseline
    return rows


def combine(logit_full: float, comp_logits: Sequence[float], suff_logits: Sequence[float],
            steps: int = COMPREHENSIVENESS_STEPS) -> tuple[float, float]:
    """(comprehensiveness, sufficiency) from the unperturbed logit and the perturbed ones (in set order)."""
    drops = [0.0] * steps
    for k, logit in enumerate(comp_logits[:steps]):
        drops[k] = logit_full - float(logit)
    comp = sum(drops) / steps / logit_full
    suff_drops = [logit_full - float(logit) for logit in suff_logits]
    suff = (sum(suff_drops) / len(suff_drops)) / logit_full
    return comp, suff


def faithfulness(model, input_ids, scores, target_token_id: int, baseline_token_id: int, target_position: int = -1,
                 *, measure: str = "logit", batch_rows: int = DEFAULT_BATCH_ROWS) -> tuple[float, float]:
    """(comprehensiveness, sufficiency) of one sequence's ``scores``, the perturbed copies scored together
    (the sets both metrics share, and the unperturbed sequence, once)."""
    _check_measure(measure)
    ids = _ids_1d(input_ids).cpu()
    n = ids.numel()
    s = _scores_1d(scores, n)
    comp_sets, suff_sets = comprehensiveness_sets(s), sufficiency_sets(s)
    unique = list(dict.fromkeys([()] + [t for t in comp_sets + suff_sets if t]))
    logits = target_values(model, _replace(ids, unique, int(baseline_token_id)), int(target_token_id),
                           target_position, batch_rows)[measure]
    by_set = dict(zip(unique, logits.tolist()))
    full = by_set[()]
    return combine(full, [by_set[t] for t in comp_sets], [by_set[t] if t else full for t in suff_sets])


def comprehensiveness(model, input_ids, scores, target_token_id: int, baseline_token_id: int,
                      target_position: int = -1, *, measure: str = "logit",
                      batch_rows: int = DEFAULT_BATCH_ROWS) -> float:
    """Mean logit drop over k = 1 … 50 when the top-k positions 1 … n−2 (by ``scores``) are replaced by the
    baseline token, cumulatively (steps beyond the n−2 positions count 0), divided by the unperturbed logit.
    Higher is better. See the module docstring for the formula; ``measure="prob"`` uses the target's probability
    in place of its raw logit."""
    _check_measure(measure)
    ids = _ids_1d(input_ids).cpu()
    s = _scores_1d(scores, ids.numel())
    sets = [()] + comprehensiveness_sets(s)
    logits = target_values(model, _replace(ids, sets, int(baseline_token_id)), int(target_token_id),
                           target_position, batch_rows)[measure].tolist()
    return combine(logits[0], logits[1:], [logits[0]])[0]


def sufficiency(model, input_ids, scores, target_token_id: int, baseline_token_id: int,
                target_position: int = -1, *, measure: str = "logit", batch_rows: int = DEFAULT_BATCH_ROWS) -> float:
    """Mean logit drop over the ratios r ∈ {0.5, 0.8, 0.9, 0.95, 0.99} when the int(r · m) least important of the
    m positions 1 … n−2 are replaced by the baseline token, divided by the unperturbed logit. Lower is better.
    ``measure="prob"`` uses the target's probability in place of its raw logit."""
    _check_measure(measure)
    ids = _ids_1d(input_ids).cpu()
    s = _scores_1d(scores, ids.numel())
    suff_sets = sufficiency_sets(s)
    unique = list(dict.fromkeys([()] + [t for t in suff_sets if t]))
    logits = target_values(model, _replace(ids, unique, int(baseline_token_id)), int(target_token_id),
                           target_position, batch_rows)[measure]
    by_set = dict(zip(unique, logits.tolist()))
    full = by_set[()]
    return combine(full, [], [by_set[t] if t else full for t in suff_sets])[1]
