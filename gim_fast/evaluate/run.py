"""The faithfulness evaluation: examples, attributions by every method, the metrics, the result files.

One model at a time: pick the examples (the capital prompts the model answers right, or a JSONL file), group them
by token length (so no batch is ever padded and a row's result does not depend on its batch), attribute them with
every method in batches, then score every method's ranking with the paper's comprehensiveness and sufficiency.
The perturbed copies that several methods share (their rankings often agree on short prompts) are scored once, and
all perturbed copies of all examples of one length go through the model together, ``batch_rows`` rows a forward.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import models
from ..display import plural
from ..explain import resolve_baseline
from ..examples import Example, Selection, capital_examples, select_examples
from ..settings import DEFAULTS
from ..textfiles import iter_lines
from . import metrics as M
from .methods import METHODS, Method, MethodUnavailable, attnlrp_unavailable, get_method, temperature_method

__all__ = ["Example", "capital_examples", "jsonl_examples", "evaluate_model", "ModelResult", "SWEEP_TEMPERATURES"]

log = logging.getLogger(__name__)

SWEEP_TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 5.0)
DEFAULT_BATCH_SIZE = 32


def _capital_shots(data: str) -> int | None:
    """'capitals' → 0, 'capitals-3shot' → 3; None for anything else (a file)."""
    if data == "capitals":
        return 0
    if data.startswith("capitals-") and data.endswith("shot") and data[len("capitals-"):-len("shot")].isdigit():
        return int(data[len("capitals-"):-len("shot")])
    return None


def jsonl_examples(path, model, tokenizer, n: int | None = None, *, seed: int = 0,
                   batch_rows: int = M.DEFAULT_BATCH_ROWS) -> Selection:
    """Examples from a JSON Lines file: ``{"text": ..., "target": ...}`` per line. The target is the text that
    should follow (its first token is explained; rows the model gets wrong are dropped); without a target the
    model's top prediction is explained. Rows are shuffled with ``seed``."""
    candidates = jsonl_candidates(path)
    random.Random(seed).shuffle(candidates)
    return select_examples(model, tokenizer, candidates, n, batch_rows)


def jsonl_candidates(path) -> list[tuple]:
    """The rows of an evaluation JSON Lines file as (id, text, target, answer); ValueError naming the line of the
    first bad one. Needs no model: the command line checks the file before loading any."""
    candidates = []
    for line_no, line in iter_lines(path):           # UTF-8 (a leading byte-order mark dropped)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise ValueError(f'{path}:{line_no}: expected an object with a non-empty "text" string')
        target = row.get("target")
        if target is not None and not isinstance(target, str):
            raise ValueError(f'{path}:{line_no}: "target" must be a string (the text that follows)')
        candidates.append((str(row.get("id", line_no)), row["text"], target, target or ""))
    return candidates


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class MethodResult:
    method: Method
    seconds: float = 0.0                      # attribution wall time over all examples
    comprehensiveness: list[float] = field(default_factory=list)   # per example, in example order
    sufficiency: list[float] = field(default_factory=list)
    comprehensiveness_prob: list[float] = field(default_factory=list)   # the same with the target's probability
    sufficiency_prob: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=lambda: defaultdict(list))  # per-example diagnostics (IG's gap)
    unavailable: str | None = None
    checks: dict = field(default_factory=dict)   # what Method.prepare checked (AttnLRP: the side model's logits)

    @property
    def n(self) -> int:
        return len(self.comprehensiveness)


@dataclass
class ModelResult:
    model: str
    selection: Selection
    logits: list[float]                       # the unperturbed target logit per example
    methods: dict[str, MethodResult]
    seconds: dict                             # wall times: load, select, attribute, metrics, total
    baseline_token: str
    probs: list[float] = field(default_factory=list)   # the unperturbed target probability per example


def _groups(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Indices of equal-length examples, at most ``batch_size`` per batch."""
    by_len = defaultdict(list)
    for i, ex in enumerate(examples):
        by_len[ex.input_ids.numel()].append(i)
    return [idx[s:s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]


def _attribute_all(method: Method, model, examples, batches, baseline, seed, backend) -> tuple[list, dict, float]:
    scores: list = [None] * len(examples)
    extra = defaultdict(list)
    extra_rows: dict[int, dict] = {}
    started = time.perf_counter()
    for idx in batches:
        ids = torch.stack([examples[i].input_ids for i in idx])
        out = method.attribute(model, ids, [examples[i].target_id for i in idx], baseline,
                               example_keys=[examples[i].key for i in idx], seed=seed, backend=backend)
        for row, i in enumerate(idx):
            scores[i] = out.scores[row]
            extra_rows[i] = {k: v[row] for k, v in out.extra.items()}
    seconds = time.perf_counter() - started
    for i in range(len(examples)):
        for k, v in extra_rows.get(i, {}).items():
            extra[k].append(v)
    return scores, extra, seconds


def _score_all(model, examples, method_scores: dict[str, list], baseline: int, batch_rows: int):
    """({measure: unperturbed value per example}, {measure: {method: [(comp, suff) per example]}}) for both
    measures ("logit", the paper's, and "prob"), every distinct perturbed copy of an example scored once."""
    plans = {}   # (method, i) -> (comp_sets, suff_sets)
    needed = [dict.fromkeys([()]) for _ in examples]
    for name, scores in method_scores.items():
        for i, s in enumerate(scores):
            comp_sets, suff_sets = M.comprehensiveness_sets(s), M.sufficiency_sets(s)
            plans[name, i] = (comp_sets, suff_sets)
            needed[i].update(dict.fromkeys(t for t in comp_sets + suff_sets if t))
    # all rows of one sequence length go through the model together
    by_len = defaultdict(list)   # length -> [(i, set)]
    for i, sets in enumerate(needed):
        by_len[examples[i].input_ids.numel()].extend((i, t) for t in sets)
    value = {measure: {} for measure in M.MEASURES}
    for _, rows in sorted(by_len.items()):
        ids = torch.stack([M._replace(examples[i].input_ids, [t], baseline)[0] for i, t in rows])
        targets = torch.tensor([examples[i].target_id for i, _ in rows])
        values = M.target_values(model, ids, targets, -1, batch_rows)
        for measure in M.MEASURES:
            value[measure].update(zip(rows, values[measure].tolist()))
    full, results = {}, {}
    for measure, v in value.items():
        full[measure] = [v[i, ()] for i in range(len(examples))]
        results[measure] = {}
        for name in method_scores:
            per = []
            for i in range(len(examples)):
                comp_sets, suff_sets = plans[name, i]
                f = full[measure][i]
                per.append(M.combine(f, [v[i, t] for t in comp_sets], [v[i, t] if t else f for t in suff_sets]))
            results[measure][name] = per
    return full, results


def evaluate_model(model_name: str, methods: list[str], *, n: int | None, data: str = "capitals",
                   temperatures=SWEEP_TEMPERATURES, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                   batch_rows: int = 128, backend: str = "auto", cache_dir=None, model_and_tokenizer=None,
                   progress=None) -> ModelResult:
    """Evaluate ``methods`` (and GIM at each of ``temperatures``) on one model. ``progress(str)`` gets a line per
    stage. ``model_and_tokenizer`` skips loading (tests pass tiny models)."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    if model_and_tokenizer is None:
        model, tokenizer = models.load_pretrained(model_name, cache_dir=cache_dir)
    else:
        model, tokenizer = model_and_tokenizer
    model.eval()
    t_load = time.perf_counter() - t0
    baseline = resolve_baseline(None, tokenizer)

    t1 = time.perf_counter()
    shots = _capital_shots(data)
    if shots is not None:
        selection = capital_examples(model, tokenizer, n, seed=seed, shots=shots, batch_rows=batch_rows)
    else:
        selection = jsonl_examples(data, model, tokenizer, n, seed=seed, batch_rows=batch_rows)
    t_select = time.perf_counter() - t1
    examples = selection.examples
    say(f"{model_name}: {plural(len(examples), 'example')} ({selection.correct} of {selection.candidates} "
        f"candidates answered right; data set has {selection.total}), loaded in {t_load:.1f} s, "
        f"selected in {t_select:.1f} s")
    if not examples:
        raise ValueError(f"{model_name}: no example left to evaluate (the model answered none right)")

    # the methods to run: the named ones plus the temperature sweep (T = 2 is gim itself)
    todo: dict[str, Method] = {name: get_method(name) for name in methods}
    sweep_alias = {}
    for t in temperatures:
        m = temperature_method(t)
        if float(t) == DEFAULTS.softmax_temperature and "gim" in todo:
            sweep_alias[m.name] = "gim"
        todo.setdefault(m.name, m)
    for alias in sweep_alias:
        todo.pop(alias, None)

    batches = _groups(examples, batch_size)
    # warm-up outside the timings: one-time costs (oneDNN kernels for every batch shape, our attention functions,
    # captum's import) would otherwise be charged to whichever method runs first; AttnLRP's worker warms up the same
    # way in its prepare()
    first = examples[batches[0][0]]
    M.target_logits(model, first.input_ids[None], first.target_id)
    for idx in batches:
        METHODS["gim"].attribute(model, torch.stack([examples[i].input_ids for i in idx]),
                                 [examples[i].target_id for i in idx], baseline, backend=backend)
    if any(m.kind == "ig" for m in todo.values()):
        try:
            import captum.attr  # noqa: F401
        except ModuleNotFoundError:
            pass

    results: dict[str, MethodResult] = {}
    method_scores = {}
    t_attr = time.perf_counter()
    for name, method in todo.items():
        res = MethodResult(method)
        results[name] = res
        try:
            res.checks = method.prepare(model, [torch.stack([examples[i].input_ids for i in idx]) for idx in batches])
            scores, extra, seconds = _attribute_all(method, model, examples, batches, baseline, seed, backend)
        except MethodUnavailable as e:
            res.unavailable = str(e)
            say(f"{model_name}: {name}: unavailable: {e}")
            continue
        res.seconds, res.extra = seconds, extra
        method_scores[name] = scores
        say(f"{model_name}: {name}: attributed {plural(len(examples), 'example')} in {seconds:.1f} s")
    t_attr = time.perf_counter() - t_attr

    t_metrics = time.perf_counter()
    full, per_measure = _score_all(model, examples, method_scores, baseline, batch_rows)
    t_metrics = time.perf_counter() - t_metrics
    for name, per in per_measure["logit"].items():
        results[name].comprehensiveness = [c for c, _ in per]
        results[name].sufficiency = [s for _, s in per]
    for name, per in per_measure["prob"].items():
        results[name].comprehensiveness_prob = [c for c, _ in per]
        results[name].sufficiency_prob = [s for _, s in per]
    for alias, target in sweep_alias.items():
        results[alias] = results[target]
    say(f"{model_name}: metrics for {plural(len(method_scores), 'method')} in {t_metrics:.1f} s")
    seconds = {"load": t_load, "select": t_select, "attribute": t_attr, "metrics": t_metrics,
               "total": time.perf_counter() - t0}
    return ModelResult(model_name, selection, full["logit"], results, seconds, tokenizer.decode([baseline]),
                       full["prob"])


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for an empty list; 0 error for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def mean_abs(values: list[float]) -> float:
    return sum(abs(v) for v in values) / len(values)


def summary_rows(results: list[ModelResult]) -> list[dict]:
    """One row per (model, method): the means, their standard errors, seconds per example and N."""
    rows = []
    for r in results:
        for name, m in r.methods.items():
            comp, comp_se = mean_se(m.comprehensiveness)
            suff, suff_se = mean_se(m.sufficiency)
            row = {"model": r.model, "method": name, "description": m.method.description,
                   "comprehensiveness": comp, "comprehensiveness_se": comp_se,
                   "sufficiency": suff, "sufficiency_se": suff_se,
                   "comprehensiveness_prob": mean_se(m.comprehensiveness_prob)[0],
                   "comprehensiveness_prob_se": mean_se(m.comprehensiveness_prob)[1],
                   "sufficiency_prob": mean_se(m.sufficiency_prob)[0],
                   "sufficiency_prob_se": mean_se(m.sufficiency_prob)[1],
                   "seconds_per_example": m.seconds / m.n if m.n else math.nan, "n": m.n,
                   "unavailable": m.unavailable or ""}
            for gap, reference, name_gap, name_reference in (
                    ("ig_completeness_gap", "ig_logit_difference", "ig_mean_abs_completeness_gap",
                     "ig_mean_abs_logit_difference"),
                    ("attnlrp_conservation_gap", "attnlrp_logit", "attnlrp_mean_abs_conservation_gap",
                     "attnlrp_mean_abs_logit")):
                if m.extra and m.extra.get(gap):
                    row[name_gap] = mean_abs(m.extra[gap])
                    row[name_reference] = mean_abs(m.extra[reference])
            if "attnlrp_logit_max_rel_diff" in m.checks:
                row["attnlrp_logit_max_rel_diff"] = m.checks["attnlrp_logit_max_rel_diff"]
            rows.append(row)
    return rows


def example_rows(results: list[ModelResult]) -> list[dict]:
    rows = []
    for r in results:
        for name, m in r.methods.items():
            for i, (c, s) in enumerate(zip(m.comprehensiveness, m.sufficiency)):
                ex = r.selection.examples[i]
                row = {"model": r.model, "method": name, "key": ex.key, "text": ex.text, "target": ex.target,
                       "target_id": ex.target_id, "tokens": ex.input_ids.numel(), "logit": r.logits[i],
                       "prob": r.probs[i], "comprehensiveness": c, "sufficiency": s,
                       "comprehensiveness_prob": m.comprehensiveness_prob[i],
                       "sufficiency_prob": m.sufficiency_prob[i]}
                for k, v in (m.extra or {}).items():
                    row[k] = v[i]
                rows.append(row)
    return rows


def unavailable_notes(methods: list[str]) -> dict[str, str]:
    notes = {}
    reason = attnlrp_unavailable() if "attnlrp" in methods else None
    if reason:
        notes["attnlrp"] = reason
    return notes


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
