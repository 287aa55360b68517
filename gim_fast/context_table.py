"""The table ``attribute_context`` returns: a pandas DataFrame of sources, with the answer and per-token scores.

Kept apart from ``gim_fast.context`` so that ``import gim_fast`` does not import pandas.
"""
from __future__ import annotations

import numpy as np

try:
    import pandas as pd
except ModuleNotFoundError as e:   # pandas is a dependency of gim-fast; a broken environment gets the fix
    raise ModuleNotFoundError(f"attribute_context returns a pandas DataFrame and needs pandas ({e}); install it "
                              "with: pip install pandas", name=e.name) from None

from .html import AnswerView, write_answer_html
from .sources import ContextPrompt

__all__ = ["ContextAttribution", "context_table"]


class ContextAttribution(pd.DataFrame):
    """One row per source (index 0 … n−1): ``source`` (its text), ``score`` (its attribution for the whole
    answer), ``rank`` (1 = highest score), ``tokens`` (how many prompt tokens it holds; a shared token counts by
    its share), ``start``/``end`` (its characters in ``prompt.text``).

    Besides the table: ``answer`` (text), ``answer_ids``, ``answer_tokens``, ``target`` (``"logprob"`` or
    ``"logit"``), ``prompt`` (a ``gim_fast.sources.ContextPrompt``: text, ids, spans), ``rest`` (the whole answer's
    attribution to the query, to the rest of the prompt — template, chat markup, separators, special tokens — and
    to earlier answer tokens: with the sources it adds up to the sum of all token scores), ``token_scores`` (a
    DataFrame, one row per answer token, one column per source then ``query``, ``other``, ``answer``; None with
    ``per_token=False``) and ``attribution`` (the ``gim_fast.AnswerAttribution`` over every token). Tables derived
    from this one (a slice, a sort) are plain DataFrames.
    """

    _metadata = ["answer", "answer_ids", "answer_tokens", "target", "prompt", "rest", "token_scores", "attribution"]

    @property
    def _constructor(self):
        return pd.DataFrame

    def _source_scores(self) -> np.ndarray:
        """``[M, n]``: each answer token's score of each source."""
        if self.token_scores is None:
            raise ValueError("this attribution was computed with per_token=False (the whole answer only); call "
                             "attribute_context(..., per_token=True) for per-token sources")
        return self.token_scores.iloc[:, :len(self)].to_numpy()

    def per_token(self, k: int = 3) -> pd.DataFrame:
        """Per answer token (one row each, in order): the token and its ``k`` highest-scored sources
        (``source_1`` … ``source_k``, indices into this table) with their scores (``score_1`` …)."""
        scores = self._source_scores()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        table = {"token": list(self.answer_tokens)}
        for j in range(k):
            table[f"source_{j + 1}"] = order[:, j]
            table[f"score_{j + 1}"] = np.take_along_axis(scores, order[:, j:j + 1], 1)[:, 0]
        return pd.DataFrame(table, index=pd.RangeIndex(len(self.answer_tokens), name="answer token"))

    def save_html(self, path, *, title: str = "Which sources the answer came from"):
        """Write a self-contained HTML page: the sources × answer-token heatmap, and the sources coloured by their
        score for whichever answer token the pointer is on (``gim_fast.html.AnswerView``). Returns the path."""
        p = self.prompt
        view = AnswerView(sources=list(self["source"]), answer_tokens=list(self.answer_tokens),
                          scores=self._source_scores(), label=p.text[p.query_span[0]:p.query_span[1]],
                          source_labels=[f"{i}: {text}" for i, text in enumerate(self["source"])])
        return write_answer_html(path, [view], title=title,
                                 subtitle=f"scores: each answer token's {self.target}; answer {self.answer!r}")


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
        index=pd.RangeIndex(n, name="source"))
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
