"""The context-attribution methods the evaluation compares: one score per source for a whole answer.

Every method maps (a prompt built from n sources, an answer, the ablation oracle) to ``scores [n]`` (higher: the
source raised the answer's probability more) and reports what it cost: seconds, and the forward and backward
passes it ran through the model.

=================  ====================================================================================  ==========
``gim``            ``explain_answer(target="logprob", total=True)``: GIM of the answer's log-probability,   1 F + 1 B
                   each source the sum of its tokens' scores (``gim_fast.sources``)
``grad_x_input``   the same with every GIM modification off (plain gradient × (input − baseline))        1 F + 1 B
``leave_one_out``  f(all) − f(all but source j): the exact effect of removing each source alone           n + 1 F
``contextcite``    ContextCite's surrogate: 64 random ablations keeping each source with probability ½    64 F
                   (its masks: ``numpy.random.RandomState(s)``, s = 0 … 63), a LASSO (α = 0.01, standardised
                   masks, scikit-learn) on the logit of the answer's probability divided by its length,
                   the weights rescaled back — as ``context_cite.solver.LassoRegression`` does
``random``         N(0, 1) per source, seeded per example                                                 —
=================  ====================================================================================  ==========
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..answers import explain_answer_with
from ..settings import GIMSettings
from .ablation import KEEP_PROBABILITY, ContextAblations

__all__ = ["SourceScores", "CONTEXT_METHODS", "DEFAULT_CONTEXT_METHODS", "contextcite_masks", "lasso_surrogate",
           "logit_probability", "run_method", "CONTEXTCITE_ABLATIONS", "CONTEXTCITE_ALPHA"]

CONTEXTCITE_ABLATIONS = 64
CONTEXTCITE_ALPHA = 0.01


@dataclass
class SourceScores:
    scores: np.ndarray      # [n] float64
    seconds: float
    forwards: int           # sequences run through the model
    backwards: int          # backward passes


def _gradient(settings: GIMSettings) -> Callable:
    def method(model, tokenizer, ablations: ContextAblations, *, backend="auto", **_) -> tuple[np.ndarray, int, int]:
        prompt = ablations.prompt
        result = explain_answer_with(model, prompt.input_ids, ablations.answer_ids, settings.replace(backend=backend),
                                     tokenizer=tokenizer, target="logprob", total=True)
        tokens = result.scores[0, :len(prompt.input_ids)].detach().double().cpu().numpy()
        return tokens @ prompt.weights()[:, :ablations.n], 1, 1
    return method


def _leave_one_out(model, tokenizer, ablations: ContextAblations, **_) -> tuple[np.ndarray, int, int]:
    n = ablations.n
    keep = np.ones((n + 1, n), dtype=bool)
    keep[np.arange(1, n + 1), np.arange(n)] = False          # row 0: everything; row j + 1: all but source j
    values = ablations(keep)
    return values[0] - values[1:], n + 1, 0


def contextcite_masks(n: int, count: int = CONTEXTCITE_ABLATIONS,
                      keep_probability: float = KEEP_PROBABILITY) -> np.ndarray:
    """ContextCite's ablation masks: mask s (s = 0 … count − 1) from ``numpy.random.RandomState(s)``, each source
    kept with ``keep_probability`` (``context_cite.utils._create_mask``, base seed 0)."""
    return np.stack([np.random.RandomState(s).choice([False, True], size=n,
                                                     p=[1 - keep_probability, keep_probability])
                     for s in range(count)])


def logit_probability(logprob) -> np.ndarray:
    """log(p / (1 − p)) from log p (ContextCite's regression target, its ``aggregate_logit_probs``)."""
    logprob = np.minimum(np.asarray(logprob, dtype=np.float64), -1e-12)
    return logprob - np.log(-np.expm1(logprob))


def lasso_surrogate(masks: np.ndarray, outputs: np.ndarray, answer_tokens: int,
                    alpha: float = CONTEXTCITE_ALPHA) -> tuple[np.ndarray, float]:
    """(weights [n], bias) of ContextCite's linear surrogate: a LASSO on standardised masks predicting
    ``outputs / answer_tokens``, mapped back to unstandardised masks and multiplied by ``answer_tokens``."""
    try:
        from sklearn.linear_model import Lasso
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"the contextcite method needs scikit-learn ({e}); install it with: pip install "
                                  "scikit-learn (or: pip install 'gim-fast[eval]')", name=e.name) from None
    x = np.asarray(masks, dtype=np.float32)
    y = np.asarray(outputs, dtype=np.float64) / answer_tokens
    scaler = StandardScaler()
    lasso = Lasso(alpha=alpha, random_state=0, fit_intercept=True)
    make_pipeline(scaler, lasso).fit(x, y)
    weight = lasso.coef_ / scaler.scale_
    bias = lasso.intercept_ - (scaler.mean_ / scaler.scale_) @ lasso.coef_
    return weight * answer_tokens, float(bias * answer_tokens)


def _contextcite(model, tokenizer, ablations: ContextAblations, **_) -> tuple[np.ndarray, int, int]:
    masks = contextcite_masks(ablations.n)
    outputs = logit_probability(ablations(masks))
    weights, _bias = lasso_surrogate(masks, outputs, len(ablations.answer_ids))
    return weights, len(masks), 0


def _random(model, tokenizer, ablations: ContextAblations, *, key: str = "", seed: int = 0, **_):
    g = np.random.default_rng(zlib.crc32(f"{seed}:{key}".encode()))
    return g.standard_normal(ablations.n), 0, 0


CONTEXT_METHODS: dict[str, tuple[str, Callable]] = {
    "gim": ("GIM of the answer's log-probability (explain_answer, total=True)", _gradient(GIMSettings())),
    "grad_x_input": ("gradient × input (every GIM modification off)", _gradient(GIMSettings.off())),
    "leave_one_out": ("exact leave-one-out: f(all) − f(all but j)", _leave_one_out),
    "contextcite": (f"ContextCite surrogate ({CONTEXTCITE_ABLATIONS} ablations + LASSO)", _contextcite),
    "random": ("random N(0, 1) per source", _random),
}
DEFAULT_CONTEXT_METHODS = tuple(CONTEXT_METHODS)


def run_method(name: str, model, tokenizer, ablations: ContextAblations, **kwargs) -> SourceScores:
    """Run one method, timed. Ablations it needs are computed now (its forwards are part of its time) and cached
    in ``ablations`` for the metrics."""
    if name not in CONTEXT_METHODS:
        raise ValueError(f"unknown context method {name!r}; accepted: {', '.join(CONTEXT_METHODS)}")
    started = time.perf_counter()
    scores, forwards, backwards = CONTEXT_METHODS[name][1](model, tokenizer, ablations, **kwargs)
    return SourceScores(np.asarray(scores, dtype=np.float64), time.perf_counter() - started, forwards, backwards)
