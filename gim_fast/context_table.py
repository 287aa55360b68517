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

__all__ = ["ContextAttribution", "context_table", "rank_of"]


class ContextAttribution(pd.DataFrame):
    """One row per source (index 0 … n−1): ``source`` (its text), ``score`` (its attribution for the whole
    answer), ``rank`` (1 = highest score), ``tokens`` (how many prompt tokens it holds; a shared token counts by
    its share), ``start``/``end`` (its characters in ``prompt.text``).

    Besides the table: ``answer`` (text), ``answer_ids``, ``answer_tokens``, ``target`` (``"logprob"`` or
    ``"logit"``), ``prompt`` (a ``gim_fast.sources.ContextPrompt``: text, ids, spans), ``rest`` (the whole answer's
    attribution to the query, to the rest of the prompt — template, chat markup, separators, special tokens — and
    to earlier answer tokens: with the sources it adds up to the sum of all token scores), ``token_scores`` (a
    DataFrame, one row per answer token, one column per source then ``query``, ``other``, ``answer``; computed
    when first read unless ``attribute_context(..., per_token=True)`` computed it at once) and ``attribution``
    (the ``gim_fast.AnswerAttribution`` the scores came from: the whole answer's, or every token's). Tables derived
    from this one (a slice, a sort) are plain DataFrames.
    """

    _metadata = ["answer", "answer_ids", "answer_tokens", "target", "prompt", "rest", "attribution", "_token_rows",
                 "_per_token_rows"]

    @property
    def _constructor(self):
        return pd.DataFrame

    @property
    def token_scores(self) -> pd.DataFrame:
        """One row per answer token, one column per source then ``query``, ``other``, ``answer``: each answer
        token's own GIM attribution. Computed on first use when the call did not ask for ``per_token=True`` (one
        more forward and M backward passes through the model and settings of the call)."""
        if self._token_rows is None:
            result = self._per_token_rows()
            self._token_rows = _token_frame(_parts(self.prompt, result), len(self))
        return self._token_rows

    def _source_scores(self) -> np.ndarray:
        """``[M, n]``: each answer token's score of each source."""
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
    ``[1, P + M]`` for the whole answer). ``per_token_rows()``: the per-token result, computed when first needed
    (with ``per_token=False``)."""
    parts = _parts(prompt, result)
    weights = prompt.weights()
    whole = parts.sum(0)
    n = len(prompt.sources)
    rank = rank_of(whole[:n])
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
    table._token_rows = _token_frame(parts, n) if per_token else None
    table._per_token_rows = per_token_rows
    table.attribution = result
    return table
