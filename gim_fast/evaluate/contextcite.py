"""The real ContextCite package (``context-cite==0.0.4``, github.com/MadryLab/context-cite) as a context method.

Its requirements (nltk, spacy, datasets, scikit-learn, pandas, tqdm) fit this environment, so it is imported here
and runs unmodified: the documents are handed to it through its ``partitioner=`` argument (a partitioner whose
sources are exactly the evaluation's documents, joined by the prompt's separator), its prompt template is the
evaluation's (ContextCite's own default, ``"Context: {context}\\n\\nQuery: {query}"``, as the user's message of the
tokenizer's chat template, which ContextCite always applies), and its response is the evaluated answer: the cached
output it would have generated is set to the prompt followed by the answer, so that its ablations score the same
answer tokens as every other method. ``ContextCiter.get_attributions()`` then runs its ``num_ablations`` forward
passes (masks from ``numpy.random.RandomState(s)``, s = 0 …) and fits its LASSO surrogate.

Importing ``context_cite`` calls ``nltk.download("punkt_tab")`` (used only by its sentence splitter, which a
partitioner replaces); offline that prints an error and goes on. Its import is deferred to the first use.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from .unavailable import MethodUnavailable

__all__ = ["contextcite_scores", "unavailable", "VERSION"]

VERSION = "0.0.4"


def unavailable() -> str | None:
    """Why the package cannot run here; None if it can."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("context-cite")
    except importlib.metadata.PackageNotFoundError:
        return (f"the context-cite package is not installed: pip install context-cite=={VERSION} (or: pip install "
                "'gim-fast[eval]')")
    if version != VERSION:
        return f"context-cite {version} is installed; this evaluation was written against {VERSION}"
    return None


def _import():
    reason = unavailable()
    if reason:
        raise MethodUnavailable(reason)
    # its import downloads nltk's sentence splitter (unused here) and prints the failure when offline
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        from context_cite import ContextCiter
        from context_cite.context_partitioner import BaseContextPartitioner
    logging.getLogger("ContextCite").setLevel(logging.WARNING)
    return ContextCiter, BaseContextPartitioner


def _partitioner(base, sources: list[str], separator: str):
    class Documents(base):
        """The evaluation's documents as ContextCite's sources; a mask keeps some of them, joined as the prompt
        joins them."""

        def __init__(self):
            super().__init__(separator.join(sources))
            self.parts = list(sources)

        @property
        def num_sources(self) -> int:
            return len(self.parts)

        def split_context(self) -> None:
            pass

        def get_source(self, index: int) -> str:
            return self.parts[index]

        def get_context(self, mask=None) -> str:
            keep = np.ones(len(self.parts), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
            return separator.join(p for p, k in zip(self.parts, keep) if k)

    return Documents()


def contextcite_scores(model, tokenizer, prompt, answer_ids, *, ablations: int = 64) -> np.ndarray:
    """``[n]``: ContextCite's attribution of ``answer_ids`` to the sources of ``prompt`` (a
    ``gim_fast.sources.ContextPrompt`` built with the chat template), from ``ablations`` forward passes.

    Raises MethodUnavailable when the package is missing, the prompt has no chat template, or ContextCite's
    re-tokenised response is not the given answer (so its scores would explain something else)."""
    ContextCiter, base = _import()
    fmt = prompt.format
    if not fmt.chat:
        raise MethodUnavailable("ContextCite always applies the tokenizer's chat template; this prompt has none")
    pad_token, side = tokenizer.pad_token, tokenizer.padding_side
    try:
        citer = ContextCiter(model, tokenizer, fmt.separator.join(prompt.sources), prompt.query,
                             num_ablations=ablations, prompt_template=fmt.template,
                             partitioner=_partitioner(base, prompt.sources, fmt.separator))
        prompt_ids, prompt_text = citer._get_prompt_ids(return_prompt=True)
        if list(prompt_ids) != list(prompt.input_ids):
            raise MethodUnavailable("ContextCite builds a different prompt from these sources than the evaluation")
        citer._cache["output"] = prompt_text + tokenizer.decode(list(answer_ids))
        if list(citer._response_ids) != list(answer_ids):
            raise MethodUnavailable("ContextCite tokenises the answer differently after the prompt; its scores "
                                    "would explain other tokens")
        with contextlib.redirect_stderr(io.StringIO()):       # its progress bar
            scores = citer.get_attributions(as_dataframe=False, verbose=False)
    finally:
        tokenizer.pad_token, tokenizer.padding_side = pad_token, side
    return np.asarray(scores, dtype=np.float64)
