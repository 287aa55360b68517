"""Sources removed from a prompt, and ``gim-ablations``: GIM's source scores corrected by a few ablations.

``answer_logprobs(model, prompts, answer_ids)``: log p(answer | prompt) for many prompts, batched. Ablated prompts
have different lengths: they are scored left-padded (with position ids counted over the real tokens, so every row
gets the numbers it gets alone, up to float rounding), longest first, about ``batch_tokens`` padded tokens per
forward pass, computing the logits of the answer positions only.

``fit_surrogate``: the linear surrogate of ``attribute_context(..., method="gim-ablations")``. With f(k) the
answer's log-probability when only the sources of keep-mask k are in the prompt (a removed source's text is not in
the prompt at all, as ContextCite ablates), g GIM's source scores on the full prompt, and the values of f at the
full prompt (free: GIM's own forward computes it) and at K random masks keeping each source with probability ½:

1. the prior: least squares of f(k) ≈ b + a · Σ_j k_j g_j + c · Σ_j k_j over the K + 1 points gives a·g + c, GIM's
   scores on the scale of ablation with a common per-source offset c (in these evaluations most sources raise
   the answer's probability a little when they are in the prompt, which GIM on the full prompt does not see);
2. the correction: a ridge regression of the residuals on the centred masks (penalty ``ridge`` on the change of
   each source's weight, the intercept free) moves each weight toward what the ablations say.

The scores are prior + correction: a linear surrogate of f, like ContextCite's (which fits a LASSO to 64 ablations
with no prior). Cost: GIM's forward and backward, then K forwards.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .integration import eval_mode, input_device

__all__ = ["answer_logprobs", "surrogate_masks", "fit_surrogate", "gim_ablation_scores", "DEFAULT_ABLATIONS",
           "SURROGATE_RIDGE", "DEFAULT_BATCH_TOKENS"]

DEFAULT_ABLATIONS = 6          # with GIM's forward and backward: 8 forward-equivalents, ContextCite's 64 / 8
SURROGATE_RIDGE = 0.3
KEEP_PROBABILITY = 0.5
DEFAULT_BATCH_TOKENS = 4096
_LOGITS_BYTES = 1 << 30        # at most ~1 GiB of float32 logits per forward (Gemma's vocabulary is 262k)


@torch.no_grad()
def answer_logprobs(model, prompts: Sequence[Sequence[int]], answer_ids: Sequence[int], *,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS) -> np.ndarray:
    """``[len(prompts)]`` float64: log p(answer | prompt) for each prompt (lists of token ids), the same answer
    after every prompt. The model is left as it was (eval mode for the call)."""
    answer = [int(t) for t in answer_ids]
    m = len(answer)
    if m == 0:
        raise ValueError("answer_ids is empty: an answer needs at least one token")
    rows = [list(map(int, p)) + answer for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: the first answer token needs a position before it")
    device = input_device(model)
    vocab = getattr(model.get_output_embeddings(), "out_features", None) or model.config.vocab_size
    max_rows = max(1, _LOGITS_BYTES // ((m + 1) * vocab * 4))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = np.zeros(len(rows))
    target = torch.tensor(answer, device=device)
    with eval_mode(model):
        start = 0
        while start < len(order):
            longest = len(rows[order[start]])
            count = max(1, min(batch_tokens // longest, max_rows))
            chunk = order[start:start + count]
            ids = torch.zeros((len(chunk), longest), dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, longest - len(rows[i]):] = torch.tensor(rows[i])
                mask[r, longest - len(rows[i]):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False, logits_to_keep=m + 1).logits
            acc = torch.promote_types(logits.dtype, torch.float32)           # float32, float64 for float64 models
            logp = torch.log_softmax(logits[:, :m].to(acc), -1)              # position P + j − 1 predicts token j
            picked = logp.gather(-1, target.expand(len(chunk), -1)[..., None])[..., 0]
            out[chunk] = picked.double().sum(-1).cpu().numpy()
            start += count
    return out


def surrogate_masks(n: int, count: int, *, seed: int | str = 0) -> np.ndarray:
    """``[count, n]`` keep-masks for the surrogate, each source kept with probability ½, from a generator seeded by
    ``seed`` (an int or a string); a mask that keeps every source (the full prompt, already known) is drawn again."""
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    g = np.random.default_rng(seed)
    masks = g.random((count, n)) < KEEP_PROBABILITY
    for row in masks:
        while row.all():
            row[:] = g.random(n) < KEEP_PROBABILITY
    return masks


def fit_surrogate(gim_scores, full_value: float, masks, values, *, ridge: float = SURROGATE_RIDGE) -> np.ndarray:
    """``[n]``: the surrogate's weights (see the module docstring) from GIM's scores ``g`` ``[n]``, f(full prompt),
    and f at ``masks`` ``[K, n]`` (``values`` ``[K]``)."""
    g = np.asarray(gim_scores, dtype=np.float64).reshape(-1)
    masks = np.asarray(masks, dtype=bool).reshape(-1, g.size)
    points = np.concatenate([np.ones((1, g.size)), masks.astype(np.float64)])
    y = np.concatenate([[float(full_value)], np.asarray(values, dtype=np.float64).reshape(-1)])
    if len(y) != len(points):
        raise ValueError(f"values has {len(y) - 1} entries for {len(masks)} masks")
    features = np.stack([points @ g, points.sum(1), np.ones(len(points))], 1)
    (a, c, _b), *_ = np.linalg.lstsq(features, y, rcond=None)
    prior = a * g + c
    residual = y - points @ prior
    centred = points - points.mean(0)
    correction = np.linalg.solve(centred.T @ centred + ridge * np.eye(g.size),
                                 centred.T @ (residual - residual.mean()))
    return prior + correction


def gim_ablation_scores(model, tokenizer, prompt, answer_ids, gim_scores, full_value: float, *,
                        ablations: int = DEFAULT_ABLATIONS, seed: int = 0,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS) -> np.ndarray:
    """``[n]``: the surrogate's weights for the sources of ``prompt`` (a ``gim_fast.sources.ContextPrompt``) from
    GIM's scores and f(full prompt), after ``ablations`` forward passes of the prompt rebuilt from random halves of
    the sources (masks: :func:`surrogate_masks` with ``seed``)."""
    masks = surrogate_masks(len(prompt.sources), ablations, seed=seed)
    values = answer_logprobs(model, prompt.ablated_ids(tokenizer, masks), answer_ids, batch_tokens=batch_tokens)
    return fit_surrogate(gim_scores, full_value, masks, values)
