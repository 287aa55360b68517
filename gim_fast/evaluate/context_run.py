"""The context-attribution evaluation: which documents an answer came from, against the ground truth of ablation.

Per model and context size n (documents): walk the questions of ``gim_fast.data.context_examples(n)`` in their
seeded order, generate each answer (greedy, at most ``max_new_tokens``, cut at the end-of-sequence token and at the
first line break), keep those whose answer names the capital (``ContextExample.is_answered_by``: not merely
inside the country's name), until ``count`` are kept (or ``limit`` questions were asked). For each kept one: every method's source scores with its cost (``context_methods``), then
ContextCite's metrics (``ablation``: top-k drop for k = 1, 3, 5 and LDS over 32 random half-ablations, the same
masks for every method) and the rank the method gives the gold document.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..context import generate_answers
from ..data import context_examples
from .. import models
from ..sources import PromptFormat, build_prompt
from .ablation import LDS_ABLATIONS, TOP_K, ContextAblations, lds, random_masks, spearman, top_k_drop
from .context_methods import CONTEXT_METHODS, run_method
from .context_tasks import TASKS, task_examples
from .unavailable import MethodUnavailable

__all__ = ["ContextRow", "ContextSelection", "ContextModelResult", "evaluate_context", "evaluate_tasks",
           "select_context_examples", "split_lds", "TASKS",
           "gold_rank", "DEFAULT_SIZES", "DEFAULT_COUNTS", "MAX_NEW_TOKENS"]

log = logging.getLogger(__name__)

DEFAULT_SIZES = (10, 30, 100)
DEFAULT_COUNTS = (10, 4, 1)   # examples per size, as in the run of bench/results/context
MAX_NEW_TOKENS = 16
GENERATION_BATCH = 8


@dataclass
class ContextRow:
    """One evaluated example: the answer, and per method its scores, cost and metrics."""

    key: str
    documents: int
    gold: int
    answer: str
    answer_tokens: int
    prompt_tokens: int
    full_logprob: float
    methods: dict = field(default_factory=dict)   # name -> {"scores", "seconds", "forwards", "backwards",
    #                                                 "drop": {k: v}, "lds", "lds_top_kept", "lds_top_removed", "gold_rank"}
    task: str = "capitals"                        # "capitals" or a written task of gim_fast.evaluate.context_tasks
    unavailable: dict = field(default_factory=dict)   # name -> why the method could not run on this example

    @property
    def group(self) -> str:
        """What the report groups by: the written task, or capitals with its number of documents."""
        return f"capitals-{self.documents}" if self.task == "capitals" else self.task


@dataclass
class ContextSelection:
    documents: int
    asked: int               # questions the model answered (generated)
    correct: int             # how many answers contained the capital
    total: int               # questions in the data set
    seconds: float           # generation time


@dataclass
class ContextModelResult:
    model: str
    chat: bool
    selections: list[ContextSelection]
    rows: list[ContextRow]
    seconds: dict


def gold_rank(scores, gold: int) -> float:
    """The gold source's rank by score, 1 = highest; tied sources share their mean rank."""
    s = np.asarray(scores, dtype=np.float64)
    return 1.0 + float((s > s[gold]).sum()) + 0.5 * float((s == s[gold]).sum() - 1)


def _cut_at_newline(tokenizer, ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if "\n" in tokenizer.decode([t]):
            return ids[:i]
    return ids


def select_context_examples(model, tokenizer, fmt: PromptFormat, documents: int, count: int, *, seed: int = 0,
                            limit: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS, keep_wrong: bool = False,
                            progress=None):
    """([(example, prompt, answer_ids)] of up to ``count`` examples answered right (with ``keep_wrong``: answered
    at all), ContextSelection)."""
    say = progress or (lambda _msg: None)
    candidates = context_examples(documents, seed=seed)
    limit = len(candidates) if limit is None else min(limit, len(candidates))
    kept, asked, correct = [], 0, 0
    started = time.perf_counter()
    while len(kept) < count and asked < limit:
        chunk = candidates[asked:min(limit, asked + GENERATION_BATCH)]
        prompts = [build_prompt(tokenizer, ex.sources, ex.query, template=fmt.template, separator=fmt.separator,
                                chat=fmt.chat) for ex in chunk]
        answers = generate_answers(model, tokenizer, [p.input_ids for p in prompts], max_new_tokens)
        for ex, prompt, ids in zip(chunk, prompts, answers):
            asked += 1
            ids = _cut_at_newline(tokenizer, ids)
            right = bool(ids) and ex.is_answered_by(tokenizer.decode(ids))
            correct += right
            if (right or (keep_wrong and ids)) and len(kept) < count:
                kept.append((ex, prompt, ids))
        say(f"{documents} documents: {len(kept)} of {count} kept after {asked} questions")
    return kept, ContextSelection(documents, asked, correct, len(candidates), time.perf_counter() - started)


def split_lds(ablations: ContextAblations, scores, masks) -> tuple[float, float]:
    """LDS over the masks that keep the top-scored source, and over those that remove it (a prediction must then
    rank the rest); NaN where fewer than 3 masks fall on a side."""
    s = np.asarray(scores, dtype=np.float64)
    top = int(np.argmax(s))
    masks = np.asarray(masks, dtype=bool)
    values, predicted = ablations(masks), masks.astype(np.float64) @ s
    out = []
    for side in (masks[:, top], ~masks[:, top]):
        out.append(spearman(predicted[side], values[side]) if side.sum() >= 3 else float("nan"))
    return out[0], out[1]


def evaluate_example(model, tokenizer, example, prompt, answer_ids, methods, *, seed: int = 0, backend="auto",
                     batch_tokens: int | None = None) -> ContextRow:
    kwargs = {} if batch_tokens is None else {"batch_tokens": batch_tokens}
    ablations = ContextAblations(model, tokenizer, prompt, answer_ids, **kwargs)
    row = ContextRow(example.key, len(example.sources), example.gold, tokenizer.decode(answer_ids), len(answer_ids),
                     len(prompt.input_ids), ablations.full, task=getattr(example, "task", "capitals"))
    scored = {}
    for name in methods:                # every method first: its forwards are timed, not served from the cache
        try:
            scored[name] = run_method(name, model, tokenizer, ablations, key=example.key, seed=seed, backend=backend)
        except MethodUnavailable as e:
            row.unavailable[name] = str(e)
            log.warning("%s: unavailable for %s: %s", name, example.key, e)
    masks = random_masks(ablations.n, LDS_ABLATIONS, seed=f"{seed}:lds:{example.key}:{ablations.n}")
    for name, result in scored.items():
        kept, removed = split_lds(ablations, result.scores, masks)
        row.methods[name] = {
            "scores": result.scores.tolist(), "seconds": result.seconds, "forwards": result.forwards,
            "backwards": result.backwards, "drop": top_k_drop(ablations, result.scores, TOP_K),
            "lds": lds(ablations, result.scores, masks), "lds_top_kept": kept, "lds_top_removed": removed,
            "gold_rank": gold_rank(result.scores, example.gold)}
    return row


def _prepare(model_name: str, methods, cache_dir, model_and_tokenizer, placement: dict | None):
    """What both evaluations do first: check ``methods``, load the model (unless given) and read its prompt
    format; returns (model, tokenizer, format)."""
    for name in methods:
        if name not in CONTEXT_METHODS:
            raise ValueError(f"unknown context method {name!r}; accepted: {', '.join(CONTEXT_METHODS)}")
    if model_and_tokenizer is None:
        model, tokenizer = models.load_pretrained(model_name, cache_dir=cache_dir, **(placement or {}))
    else:
        model, tokenizer = model_and_tokenizer
    return model, tokenizer, PromptFormat.resolve(tokenizer)


def _evaluate_all(model, tokenizer, items, methods, rows: list, *, label: str, say, seed: int, backend,
                  batch_tokens) -> float:
    """:func:`evaluate_example` on each (example, prompt, answer ids) of ``items``, its row appended to ``rows`` and
    a progress line said after each; returns the seconds it took."""
    start = time.perf_counter()
    for i, (ex, prompt, answer_ids) in enumerate(items, 1):
        rows.append(evaluate_example(model, tokenizer, ex, prompt, answer_ids, methods, seed=seed, backend=backend,
                                     batch_tokens=batch_tokens))
        say(f"{label}: example {i}/{len(items)} done ({time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start


def evaluate_tasks(model_name: str, methods, tasks, *, counts, split: str = "dev", seed: int = 0,
                   backend: str = "auto", cache_dir=None, model_and_tokenizer=None, batch_tokens: int | None = None,
                   progress=None, checkpoint=None, placement: dict | None = None) -> ContextModelResult:
    """Evaluate ``methods`` on the written tasks (``gim_fast.evaluate.context_tasks``) of ``split``: ``counts[i]``
    examples of ``tasks[i]``, each with its fixed answer (no generation, no selection). ``placement`` as for
    :func:`evaluate_context`."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    model, tokenizer, fmt = _prepare(model_name, methods, cache_dir, model_and_tokenizer, placement)
    t_load = time.perf_counter() - t0
    rows, selections = [], []
    t_eval = 0.0
    result = None
    for task, count in zip(tasks, counts):
        examples = task_examples(task, count, split=split, seed=seed)
        selections.append(ContextSelection(len(examples[0].sources), len(examples), len(examples),
                                           len(examples), 0.0))
        items = [(ex, build_prompt(tokenizer, list(ex.sources), ex.query, template=fmt.template,
                                   separator=fmt.separator, chat=fmt.chat),
                  [int(t) for t in tokenizer.encode(ex.response, add_special_tokens=False)]) for ex in examples]
        t_eval += _evaluate_all(model, tokenizer, items, methods, rows, label=f"{model_name}, {task} ({split})",
                                say=say, seed=seed, backend=backend, batch_tokens=batch_tokens)
        result = ContextModelResult(model_name, fmt.chat, selections, rows,
                                    {"load": t_load, "select": 0.0, "evaluate": t_eval,
                                     "total": time.perf_counter() - t0})
        if checkpoint is not None:
            checkpoint(result)
    return result


def evaluate_context(model_name: str, methods, *, sizes=DEFAULT_SIZES, counts=DEFAULT_COUNTS, seed: int = 0,
                     limit: int | None = None, backend: str = "auto", cache_dir=None, model_and_tokenizer=None,
                     batch_tokens: int | None = None, keep_wrong: bool = False, progress=None,
                     checkpoint=None, placement: dict | None = None) -> ContextModelResult:
    """Evaluate ``methods`` on one model; ``counts[i]`` examples of ``sizes[i]`` documents. ``limit``: ask at most
    this many questions per size. ``keep_wrong``: evaluate wrong answers too (smoke tests on tiny random models).
    ``model_and_tokenizer`` skips loading; ``placement``: ``device_map``, ``max_memory``, ``offload_folder`` for
    ``load_pretrained``.
    ``checkpoint(partial result)`` is called after each size (e.g. to write the files so far)."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    model, tokenizer, fmt = _prepare(model_name, methods, cache_dir, model_and_tokenizer, placement)
    t_load = time.perf_counter() - t0
    selections, rows = [], []
    t_select = t_eval = 0.0
    for documents, count in zip(sizes, counts):
        t1 = time.perf_counter()
        kept, selection = select_context_examples(model, tokenizer, fmt, documents, count, seed=seed, limit=limit,
                                                  keep_wrong=keep_wrong, progress=say)
        t_select += time.perf_counter() - t1
        selections.append(selection)
        say(f"{model_name}, {documents} documents: {len(kept)} examples ({selection.correct} of {selection.asked} "
            f"answered right)")
        t_eval += _evaluate_all(model, tokenizer, kept, methods, rows, label=f"{model_name}, {documents} documents",
                                say=say, seed=seed, backend=backend, batch_tokens=batch_tokens)
        result = ContextModelResult(model_name, fmt.chat, selections, rows,
                                    {"load": t_load, "select": t_select, "evaluate": t_eval,
                                     "total": time.perf_counter() - t0})
        if checkpoint is not None:
            checkpoint(result)
    return result

