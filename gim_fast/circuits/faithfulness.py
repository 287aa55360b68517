"""Faithfulness of circuits, as the MIB benchmark's circuit track defines it (Mueller et al. 2025).

For each circuit size k (percent of the scored edges, or nodes), the circuit C keeps the top k% by score (the
``signed`` ranking; by |score| with the ``absolute`` one), pruned, and the model runs with every other edge patched (``patching``). With m the
task's metric averaged over the examples, M the full model and ∅ the empty circuit (every edge patched):

    f(k) = (m(C) − m(∅)) / (m(M) − m(∅))          CPR = ∫ f,    CMD = ∫ |1 − f|

over the fraction of edges, by the trapezoid rule on the points k ∈ {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100}%
(so from 0.001 to 1, as MIB computes it: CPR is at most 0.999 for f ≡ 1). m(M) is a plain clean forward pass and
m(∅) the patching machinery with no edge (equal to the corrupt run's up to rounding), as in MIB; f(100%) = 1
exactly. Higher CPR is better, lower CMD is better; MIB reports CPR with the signed ranking and CMD with the
absolute one (``rankings=RANKINGS``). Node-level circuits keep the top k% nodes (heads, MLPs and the embedding)
with every edge between kept nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attribution import Scores
from .graph import PERCENTAGES, Graph
from .patching import circuit_metric
from .tasks import Task, task_metric

__all__ = ["Curve", "Faithfulness", "faithfulness", "area", "circuits_for", "spearman", "LEVELS", "RANKINGS"]

LEVELS = ("edge", "node")
RANKINGS = ("signed", "absolute")


def area(percentages, values, *, distance_from_one: bool = False) -> float:
    """The trapezoid-rule area under ``values`` (or ``|1 − values|``) over the fractions ``percentages / 100``."""
    xs = [p / 100 for p in percentages]
    ys = [abs(1 - v) if distance_from_one else v for v in values]
    return sum((x2 - x1) * (y1 + y2) / 2 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:]))


@dataclass
class Curve:
    method: str
    level: str
    ranking: str                     # "signed" (by score) or "absolute" (by |score|)
    percentages: tuple[float, ...]
    faithfulness: list[float]
    edges: list[int]                 # edges kept in each circuit, after pruning
    seconds: float = 0.0             # the scoring time of the method (over all examples)

    @property
    def cpr(self) -> float:
        return area(self.percentages, self.faithfulness)

    @property
    def cmd(self) -> float:
        return area(self.percentages, self.faithfulness, distance_from_one=True)


@dataclass
class Faithfulness:
    curves: list[Curve]
    full_metric: float               # m(M), mean over the examples
    empty_metric: float              # m(∅)
    per_example_full: torch.Tensor = field(repr=False)
    per_example_empty: torch.Tensor = field(repr=False)


def circuits_for(graph: Graph, scores: Scores, level: str, percentages=PERCENTAGES, *, absolute: bool = False,
                 prune: bool = True) -> list[torch.Tensor]:
    """The circuit of each size: the top k% edges (``level="edge"``) or nodes (``"node"``)."""
    if level == "edge":
        return [graph.top_edges(scores.edges, int(p / 100 * graph.n_edges), absolute=absolute, prune=prune)
                for p in percentages]
    if level == "node":
        return [graph.top_nodes(scores.nodes, int(p / 100 * graph.n_sources), absolute=absolute, prune=prune)
                for p in percentages]
    raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")


def faithfulness(model, task: Task, scores: list[Scores], *, levels=("edge",), rankings=("signed",),
                 percentages=PERCENTAGES, prune: bool = True, batch_size: int = 32, progress=None) -> Faithfulness:
    """Faithfulness curves of every method's circuits at every level (see the module docstring).

    Each distinct circuit runs once per batch (the full circuit, shared by all methods, and identical circuits
    of different methods or sizes run once). ``progress(total)``, if given, returns a callable that is called
    with 1 after each of the ``total`` circuit runs."""
    if not scores:
        raise ValueError("no scores to evaluate")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    for ranking in rankings:
        if ranking not in RANKINGS:
            raise ValueError(f"unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
    percentages = tuple(sorted(float(p) for p in percentages))
    if not percentages or percentages[0] <= 0 or percentages[-1] > 100:
        raise ValueError(f"percentages must lie in (0, 100], got {percentages}")
    graph = scores[0].graph
    unique: dict[bytes, int] = {}
    circuits: list[torch.Tensor] = [graph.empty()]
    plan = []    # (scores, level, ranking, [circuit index per percentage], [edges kept])
    for s in scores:
        for level in levels:
            for ranking in rankings:
                indices, counts = [], []
                for circuit in circuits_for(graph, s, level, percentages, absolute=ranking == "absolute",
                                            prune=prune):
                    key = circuit.numpy().tobytes()
                    if key not in unique:
                        unique[key] = len(circuits)
                        circuits.append(circuit)
                    indices.append(unique[key])
                    counts.append(int(circuit.sum()))
                plan.append((s, level, ranking, indices, counts))
    # The full circuit is the clean run itself: a plain forward pass (patching nothing is bit for bit the same).
    full_key = graph.full().numpy().tobytes()
    patched = [i for i, c in enumerate(circuits) if c.numpy().tobytes() != full_key]
    update = progress(len(patched) * len(task.batches(batch_size))) if progress is not None else None
    metrics = circuit_metric(model, task, [circuits[i] for i in patched], batch_size=batch_size, graph=graph,
                             progress=update)
    per_full = task_metric(model, task, "clean", batch_size=batch_size)
    mean = {i: per_full.mean().item() for i in range(len(circuits))}
    mean.update({i: metrics[j].mean().item() for j, i in enumerate(patched)})
    m_full, m_empty = per_full.mean().item(), mean[0]
    denominator = m_full - m_empty
    if denominator == 0:
        raise ValueError("the corrupt prompts do not change the metric (m(full) = m(empty)): faithfulness is "
                         "undefined; use corrupt prompts that change the answer")
    curves = [Curve(s.method, level, ranking, percentages, [(mean[i] - m_empty) / denominator for i in indices],
                    counts, s.seconds) for s, level, ranking, indices, counts in plan]
    return Faithfulness(curves, m_full, m_empty, per_full, metrics[0])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n−1 with ties given their average rank."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long vectors (ties: average ranks)."""
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"spearman needs two vectors of one length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")
