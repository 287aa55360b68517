"""The result of ``attribute_context``: a pandas DataFrame of sources that carries the answer and the per-token
scores with it, and survives ordinary pandas use.

The rows are the sources; the index is their id, ``source_id`` (0 … n−1, their order in the prompt), so that the
index never shares its name with a column: ``sort_values("source")``, ``groupby("source")``,
``merge(other, on="source")`` and ``reset_index()`` (which makes ``source_id`` a column) work as on any frame.
Tables derived from it (a copy, a sort, a boolean selection, a column selection) are ``ContextAttribution`` too and
keep the answer and the rest (pandas' ``_metadata``); :meth:`ContextAttribution.per_token` and
:meth:`ContextAttribution.save_html` work on the sources such a table still holds, found by their ids (from the
index, or from a ``source_id`` column after ``reset_index()``).

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

__all__ = ["ContextAttribution", "SOURCE_ID"]

SOURCE_ID = "source_id"   # the name of the index: a source's position in the prompt


class ContextAttribution(pd.DataFrame):
    """One row per source, indexed by ``source_id`` (0 … n−1, prompt order): ``source`` (its text), ``score`` (its
    attribution for the whole answer), ``rank`` (1 = highest score), ``tokens`` (how many prompt tokens it holds; a
    shared token counts by its share), ``start``/``end`` (its characters in ``prompt.text``).

    Besides the table: ``answer`` (text), ``answer_ids``, ``answer_tokens``, ``target`` (``"logprob"`` or
    ``"logit"``), ``prompt`` (a ``gim_fast.sources.ContextPrompt``: text, ids, spans), ``rest`` (the whole answer's
    attribution to the query, to the rest of the prompt — template, chat markup, separators, special tokens — and
    to earlier answer tokens: with the sources it adds up to the sum of all token scores), ``token_scores`` (a
    DataFrame, one row per answer token, one column per source id then ``query``, ``other``, ``answer``; None with
    ``per_token=False``) and ``attribution`` (the ``gim_fast.AnswerAttribution`` over every token). Tables derived
    from this one (``copy()``, ``sort_values``, ``table[table.score > 0]``, ``table[["source", "score"]]``, ...)
    keep all of these.
    """

    _metadata = ["answer", "answer_ids", "answer_tokens", "target", "prompt", "rest", "token_scores", "attribution"]

    @property
    def _constructor(self):
        return ContextAttribution

    def source_ids(self) -> np.ndarray:
        """The ids of the sources this table holds, in its row order: its index (``source_id``), or its
        ``source_id`` column after ``reset_index()``. A ValueError when neither is there (a table that no longer
        has one row per source, e.g. after ``groupby`` or ``merge``)."""
        if self.index.name == SOURCE_ID:
            ids = self.index.to_numpy()
        elif SOURCE_ID in self.columns:
            ids = self[SOURCE_ID].to_numpy()
        else:
            raise ValueError(f"this table has no {SOURCE_ID!r} index or column, so its rows are not known sources "
                             "(it was regrouped or merged); call this on the table attribute_context returned or on "
                             "a selection of its rows")
        n = len(self.prompt.sources) if self.prompt is not None else None
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu" or (n is not None and ((ids < 0) | (ids >= n)).any()):
            raise ValueError(f"{SOURCE_ID} holds values that are not source ids (integers 0 … {n - 1})")
        return ids.astype(np.int64)

    def _source_scores(self, ids: np.ndarray) -> np.ndarray:
        """``[M, len(ids)]``: each answer token's score of each source in ``ids``."""
        if self.token_scores is None:
            raise ValueError("this attribution was computed with per_token=False (the whole answer only); call "
                             "attribute_context(..., per_token=True) for per-token sources")
        return self.token_scores.loc[:, list(ids)].to_numpy()

    def per_token(self, k: int = 3) -> pd.DataFrame:
        """Per answer token (one row each, in order): the token and its ``k`` highest-scored sources among the
        sources of this table (``source_1`` … ``source_k``: their ``source_id``) with their scores
        (``score_1`` …)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        ids = self.source_ids()
        scores = self._source_scores(ids)
        k = min(k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        table = {"token": list(self.answer_tokens)}
        for j in range(k):
            table[f"source_{j + 1}"] = ids[order[:, j]]
            table[f"score_{j + 1}"] = np.take_along_axis(scores, order[:, j:j + 1], 1)[:, 0]
        return pd.DataFrame(table, index=pd.RangeIndex(len(self.answer_tokens), name="answer token"))

    def save_html(self, path, *, title: str = "Which sources the answer came from"):
        """Write a self-contained HTML page of the sources this table holds: the sources × answer-token heatmap,
        and the sources coloured by their score for whichever answer token the pointer is on
        (``gim_fast.html.AnswerView``). Returns the path."""
        p = self.prompt
        ids = self.source_ids()
        texts = [p.sources[i] for i in ids]
        view = AnswerView(sources=texts, answer_tokens=list(self.answer_tokens), scores=self._source_scores(ids),
                          label=p.text[p.query_span[0]:p.query_span[1]],
                          source_labels=[f"{i}: {text}" for i, text in zip(ids, texts)])
        return write_answer_html(path, [view], title=title,
                                 subtitle=f"scores: each answer token's {self.target}; answer {self.answer!r}")
