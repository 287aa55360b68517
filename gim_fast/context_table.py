"""The table ``attribute_context`` returns, computed from an ``explain_answer`` result: the sources' scores, with the
answer and per-token scores (the result's type, ``ContextAttribution``, is in ``gim_fast.context_result``).

Kept apart from ``gim_fast.context`` so that ``import gim_fast`` does not import pandas.
"""
from __future__ import annotations

import numpy as np

from .context_result import SOURCE_ID, ContextAttribution, pd
from .sources import ContextPrompt

__all__ = ["ContextAttribution", "context_table"]


def context_table(prompt: ContextPrompt, answer_ids: list[int], tokenizer, result, target: str,
                  per_token: bool) -> ContextAttribution:
    """The table of an ``explain_answer`` result over ``prompt`` (``result.scores``: ``[M, P + M]`` per token, or
    ``[1, P + M]`` for the whole answer)."""
    scores = result.scores.detach().double().cpu().numpy()
    length = len(prompt.input_ids)
    weights = prompt.weights()                                              # [P, n + 2]
    parts = np.concatenate([scores[:, :length] @ weights,                   # sources, query, other
                            scores[:, length:].sum(1, keepdims=True)], 1)   # earlier answer tokens
    whole = parts.sum(0)
    n = len(prompt.sources)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-whole[:n], kind="stable")] = np.arange(1, n + 1)
    table = ContextAttribution(
        {"source": prompt.sources, "score": whole[:n], "rank": rank, "tokens": weights[:, :n].sum(0),
         "start": [s for s, _ in prompt.source_spans], "end": [e for _, e in prompt.source_spans]},
        index=pd.RangeIndex(n, name=SOURCE_ID))
    table.answer = tokenizer.decode(answer_ids)
    table.answer_ids = list(answer_ids)
    table.answer_tokens = [tokenizer.decode([t]) for t in answer_ids]
    table.target = target
    table.prompt = prompt
    table.rest = pd.Series(whole[n:], index=["query", "other", "answer"], name="score")
    table.token_scores = (pd.DataFrame(parts, columns=[*range(n), "query", "other", "answer"],
                                       index=pd.RangeIndex(len(answer_ids), name="answer token"))
                          if per_token else None)
    table.attribution = result
    return table
