"""The table ``attribute_context`` returns, computed from an ``explain_answer`` result: the sources' scores, with the
answer and per-token scores (the result's type, ``ContextAttribution``, is in ``gim_fast.context_result``).

Kept apart from ``gim_fast.context`` so that ``import gim_fast`` does not import pandas.
"""
from __future__ import annotations

import numpy as np

from .context_result import SOURCE_ID, ContextAttribution, TokenRows, pd
from .sources import ContextPrompt

__all__ = ["ContextAttribution", "context_table", "rank_of"]


def rank_of(scores) -> np.ndarray:
    """1 = the highest score; ties: the earlier source first."""
    scores = np.asarray(scores)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return rank


def _parts(prompt: ContextPrompt, result) -> np.ndarray:
    """``[rows, n + 3]``: each row of ``result.scores`` summed over each source, the query, the rest of the prompt
    and the earlier answer tokens."""
    scores = result.scores.detach().double().cpu().numpy()
    length = len(prompt.input_ids)
    return np.concatenate([scores[:, :length] @ prompt.weights(),          # sources, query, other
                           scores[:, length:].sum(1, keepdims=True)], 1)   # earlier answer tokens


def _token_frame(parts: np.ndarray, n: int) -> pd.DataFrame:
    return pd.DataFrame(parts, columns=[*range(n), "query", "other", "answer"],
                        index=pd.RangeIndex(len(parts), name="answer token"))


def context_table(prompt: ContextPrompt, answer_ids: list[int], tokenizer, result, target: str,
                  per_token: bool, per_token_rows=None) -> ContextAttribution:
    """The table of an ``explain_answer`` result over ``prompt`` (``result.scores``: ``[M, P + M]`` per token, or
    ``[1, P + M]`` for the whole answer). With ``per_token=False``, ``per_token_rows()`` returns the per-token
    result, called when the rows are first read."""
    parts = _parts(prompt, result)
    weights = prompt.weights()
    whole = parts.sum(0)
    n = len(prompt.sources)
    table = ContextAttribution(
        {"source": prompt.sources, "score": whole[:n], "rank": rank_of(whole[:n]), "tokens": weights[:, :n].sum(0),
         "start": [s for s, _ in prompt.source_spans], "end": [e for _, e in prompt.source_spans]},
        index=pd.RangeIndex(n, name=SOURCE_ID))
    table.answer = tokenizer.decode(answer_ids)
    table.answer_ids = list(answer_ids)
    table.answer_tokens = [tokenizer.decode([t]) for t in answer_ids]
    table.target = target
    table.prompt = prompt
    table.rest = pd.Series(whole[n:], index=["query", "other", "answer"], name="score")
    if per_token:
        table._token_rows = TokenRows(frame=_token_frame(parts, n))
    elif per_token_rows is not None:
        table._token_rows = TokenRows(compute=lambda: _token_frame(_parts(prompt, per_token_rows()), n))
    table.attribution = result
    return table
