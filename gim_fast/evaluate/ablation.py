"""Context ablation: the answer's log-probability with sources removed, and ContextCite's two metrics on it.

For a prompt built from n sources (``gim_fast.sources``), an answer a of M tokens and a keep-mask k ∈ {0, 1}ⁿ, let
f(k) = log p(a | the prompt rebuilt from the kept sources only) = Σ_m log p(a_m | prompt(k), a_<m), computed in
float32 (float64 for a float64 model) and summed in float64. Removing a source removes its text (and one
separator) from the prompt, as ContextCite does (github.com/MadryLab/context-cite). Given an attribution ``scores`` (one number per source,
higher = more responsible for the answer):

- **top-k drop** (higher is better): f(all) − f(all but the k highest-scored sources), for k = 1, 3, 5;
- **LDS**, the linear datamodeling score (higher is better): the Spearman correlation, over A = 32 random masks
  keeping each source with probability ½, between the attribution's prediction Σ_j k_j · scores_j and f(k).
  A prediction that is the same for every mask (e.g. all-zero scores) has no ranking: its LDS counts as 0.

Ablated prompts have different lengths: they are scored left-padded (with position ids counted over the real
tokens, so every row gets the numbers it gets alone, up to float rounding), longest first, about
``batch_tokens`` padded tokens per forward pass, computing the logits of the answer positions only.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ..integration import eval_mode
from ..sources import ContextPrompt

__all__ = ["answer_logprobs", "ContextAblations", "top_k_sets", "top_k_drop", "lds", "spearman", "random_masks",
           "TOP_K", "LDS_ABLATIONS", "KEEP_PROBABILITY"]

TOP_K = (1, 3, 5)
LDS_ABLATIONS = 32
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
    embed = model.get_input_embeddings()
    device = embed.weight.device
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


class ContextAblations:
    """f(k), the answer's log-probability with only the sources of keep-mask k, computed on demand and cached.

    ``forwards`` counts the sequences that went through the model (cache misses)."""

    def __init__(self, model, tokenizer, prompt: ContextPrompt, answer_ids: Sequence[int], *,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.answer_ids = [int(t) for t in answer_ids]
        self.n = len(prompt.sources)
        self.batch_tokens = batch_tokens
        self.cache: dict[bytes, float] = {}
        self.forwards = 0

    def __call__(self, keep) -> np.ndarray:
        """``[A]`` float64 for keep-masks ``[A, n]`` (booleans; True = kept)."""
        keep = np.asarray(keep, dtype=bool).reshape(-1, self.n)
        keys = [row.tobytes() for row in keep]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            masks = np.stack([np.frombuffer(k, dtype=bool) for k in missing])
            values = answer_logprobs(self.model, self._prompts(masks), self.answer_ids,
                                     batch_tokens=self.batch_tokens)
            self.cache.update(zip(missing, values.tolist()))
            self.forwards += len(missing)
        return np.array([self.cache[k] for k in keys])

    def _prompts(self, masks: np.ndarray) -> list[list[int]]:
        """The prompt's own ids where every source is kept (the tokenization the attribution saw), else the ids
        of the prompt rebuilt from the kept sources."""
        partial = [i for i, row in enumerate(masks) if not row.all()]
        ids = dict(zip(partial, self.prompt.ablated_ids(self.tokenizer, masks[partial]) if partial else []))
        return [ids.get(i, self.prompt.input_ids) for i in range(len(masks))]

    @property
    def full(self) -> float:
        """f(all sources kept)."""
        return float(self(np.ones((1, self.n), dtype=bool))[0])


def _scores(scores, n: int | None = None) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if n is not None and s.size != n:
        raise ValueError(f"scores must have one value per source ({n}), got {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    return s


def top_k_sets(scores, ks: Sequence[int] = TOP_K) -> dict[int, tuple[int, ...]]:
    """The k highest-scored sources for each k (ties: the earlier source first), at most all of them."""
    s = _scores(scores)
    order = np.argsort(-s, kind="stable")
    return {k: tuple(sorted(order[:k].tolist())) for k in ks}


def _without(n: int, removed) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[list(removed)] = False
    return keep


def top_k_drop(ablations: ContextAblations, scores, ks: Sequence[int] = TOP_K) -> dict[int, float]:
    """{k: f(all) − f(all but the top k)} for ``scores`` (one per source)."""
    s = _scores(scores, ablations.n)
    sets = top_k_sets(s, ks)
    values = ablations(np.stack([np.ones(ablations.n, dtype=bool)] + [_without(ablations.n, sets[k]) for k in ks]))
    return {k: float(values[0] - v) for k, v in zip(ks, values[1:])}


def random_masks(n: int, count: int = LDS_ABLATIONS, *, seed: int | str = 0,
                 keep_probability: float = KEEP_PROBABILITY) -> np.ndarray:
    """``[count, n]`` keep-masks, each source kept with ``keep_probability``, from a generator seeded by ``seed``
    (an int, or a string such as an example's key)."""
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    return np.random.default_rng(seed).random((count, n)) < keep_probability


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties get their mean rank); 0 when either side is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(spearmanr(x, y).statistic)
    return 0.0 if math.isnan(value) else value


def lds(ablations: ContextAblations, scores, masks: np.ndarray | None = None, *, seed: int | str = 0) -> float:
    """Spearman(masks @ scores, f(masks)) over ``masks`` (default: :func:`random_masks` with ``seed``)."""
    s = _scores(scores, ablations.n)
    if masks is None:
        masks = random_masks(ablations.n, seed=seed)
    masks = np.asarray(masks, dtype=bool)
    return spearman(masks.astype(np.float64) @ s, ablations(masks))
