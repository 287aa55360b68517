"""The whole circuit experiment on one model and task: check the model does the task, score the edges with each
method, measure the faithfulness of the circuits, and optionally compare scores with exact per-edge patching."""
from __future__ import annotations

import ctypes
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..integration import input_device
from .attribution import DEFAULT_IG_STEPS, METHODS, Scores, attribute
from .faithfulness import Faithfulness, faithfulness, spearman
from .graph import PERCENTAGES, Graph
from .memory import check_circuit_memory
from .patching import edge_effects
from .tasks import Task, TaskPerformance, load_task, performance

__all__ = ["CircuitResult", "ExactComparison", "discover"]


@dataclass
class ExactComparison:
    """Attribution scores against exact patching on a sample of edges."""

    edges: torch.Tensor                  # [K, 2] (source, input)
    effects: torch.Tensor                # [K] m(full) − m(all but this edge)
    correlations: dict[str, float]       # method → Spearman correlation of its scores with the effects
    seconds: float


@dataclass
class CircuitResult:
    model: str
    task: Task
    graph: Graph
    performance: TaskPerformance
    scores: dict[str, Scores]
    faithfulness: Faithfulness
    exact: ExactComparison | None = None
    seconds: dict = field(default_factory=dict)
    peak_bytes: dict = field(default_factory=dict)   # method → peak memory of its scoring (None: not measurable)


def _resident_peak() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


@contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory of the block above what it started with, into the yielded dict's ``bytes``: on CUDA
    ``max_memory_allocated``; on the CPU the process's peak resident set (Linux: VmHWM, reset through
    /proc/self/clear_refs after glibc's ``malloc_trim`` returns freed memory); ``None`` where neither can be
    read."""
    out = {"bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand memory freed earlier back, so the resident set is live memory
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")   # reset VmHWM to the current resident set
        base = _resident_peak()
    except OSError:
        base = None
    yield out
    peak = _resident_peak()
    if base is not None and peak is not None:
        out["bytes"] = peak - base


def discover(model, tokenizer, task: str | Task, *, model_name: str = "", methods=("gim", "eap", "eap-ig", "random"),
             levels=("edge", "node"), n: int | None = 32, seed: int = 0, ig_steps: int = DEFAULT_IG_STEPS,
             batch_size: int = 16, rankings=("signed",), prune: bool = True, percentages=PERCENTAGES,
             exact_edges: int = 0, min_accuracy: float = 0.6, bar=None) -> CircuitResult:
    """Run the experiment (see the module docstring). ``bar(total, desc)`` makes a progress callback (or None)."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    seconds = {}
    started = time.perf_counter()
    if not isinstance(task, Task):
        task = load_task(task, model, tokenizer, n, seed=seed)
    task = task.subset(n)
    graph = Graph.from_model(model)
    seconds["task"] = time.perf_counter() - started
    perf = performance(model, task, batch_size)
    perf.check(task.name, model_name or type(model).__name__, min_accuracy)
    longest = max(ids.numel() for ids in task.clean)
    check_circuit_memory(model, longest, min(batch_size, len(task)), positions=task.metric.positions)

    scores, peaks = {}, {}
    device = input_device(model)
    for method in methods:
        update = bar(len(task), f"scoring: {method}") if bar else None
        with peak_memory(device) as peak:
            scores[method] = attribute(model, task, method, graph=graph, batch_size=batch_size, ig_steps=ig_steps,
                                       seed=seed, progress=update)
        peaks[method] = peak["bytes"]
    t0 = time.perf_counter()
    faith = faithfulness(model, task, list(scores.values()), levels=levels, percentages=percentages,
                         rankings=rankings, prune=prune, batch_size=batch_size,
                         progress=(lambda total: bar(total, "circuit runs")) if bar else None)
    seconds["faithfulness"] = time.perf_counter() - t0

    exact = None
    if exact_edges:
        t0 = time.perf_counter()
        all_edges = graph.edge_index()
        k = min(exact_edges, len(all_edges))
        pick = torch.randperm(len(all_edges), generator=torch.Generator().manual_seed(seed))[:k]
        edges = all_edges[pick.sort().values]
        effects = edge_effects(model, task, edges, batch_size=batch_size, graph=graph,
                               progress=bar(k * len(task.batches(batch_size)), "exact patching") if bar else None)
        correlations = {name: spearman(s.edges[edges[:, 0], edges[:, 1]], effects) for name, s in scores.items()}
        exact = ExactComparison(edges, effects, correlations, time.perf_counter() - t0)
    seconds["total"] = time.perf_counter() - started
    return CircuitResult(model_name, task, graph, perf, scores, faith, exact, seconds, peaks)
