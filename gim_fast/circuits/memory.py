"""How much memory circuit discovery needs, estimated from the config before anything runs.

Two phases, never alive together; the estimate is the larger (weights, already loaded, are not counted). With
T = batch × tokens, b the element size, N the nodes (1 + L·(heads + 1)), H the hidden size, D the head size, and
E of the L layers keeping their heads' Δ expanded (``gim_fast.circuits.deltas``; the others keep it compact):

scoring (one batch of ``attribute``):
    the clean forward and its input-gradient backward    as ``gim_fast.estimate_memory`` (no checkpointing)
    recorded node outputs, clean and corrupt              2 · b · T · (H + L·(heads·D + H)) (+ L·T·H post-norm inputs)
    the layers' input-norm inputs                         b · T · L · H
    node differences Δ                                    b · T · H · (1 + E·(heads + 1)) + b · T · (L − E)·(heads·D + H)
                                                          (+ one layer expanded on demand: b · heads · T · H)
    input gradients, 16 inputs at a time (transient)      4 · 4 · 16 · T · H (the cotangents through the input norm, in
                                                          float32) + a 16-row float32 slice of Δ
    the scores                                            4 · N · inputs (· S per position)
patching (one circuit run, no gradient):
    the corrupt run's node outputs                        b · T · (H + L·(heads·D + H))
    this run's node differences Δ                         as above
    residual reads, 16 inputs at a time (transient)       4 · 16 · b · T · H (reads, corrections, their norms)
    the forward working set (one layer, no gradient)      as one layer of ``estimate_memory``

``delta_layers`` picks E: every layer when it fits the free memory, fewer otherwise (each compact layer costs one
output-projection product per use). ``python bench/circuits.py --estimate`` prints the estimate for
Llama-3.1-8B (docs/circuits.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory import Dims, InsufficientMemoryError, available_memory, estimate_memory, format_bytes
from .graph import Graph

__all__ = ["CircuitMemoryEstimate", "estimate_circuit_memory", "check_circuit_memory", "delta_layers", "INPUT_CHUNK"]

_HEADROOM = 0.9   # use at most this share of the free memory
INPUT_CHUNK = 16  # a layer's query (key, value) inputs are built, normed and contracted this many at a time


@dataclass
class CircuitMemoryEstimate:
    """Bytes per part of each phase; ``total`` is the larger phase."""

    scoring: dict[str, int] = field(default_factory=dict)
    patching: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return max(sum(self.scoring.values()), sum(self.patching.values()))

    def __str__(self) -> str:
        lines = ["estimated memory for circuit discovery (weights not included):"]
        for phase, parts in (("scoring (attribution patching)", self.scoring),
                             ("patching (faithfulness runs)", self.patching)):
            lines.append(f"  {phase}: {format_bytes(sum(parts.values()))}")
            lines += [f"    {name:<50} {format_bytes(n):>10}" for name, n in parts.items()]
        lines.append(f"  {'total (the larger phase)':<52} {format_bytes(self.total):>10}")
        return "\n".join(lines)


def estimate_circuit_memory(config, seq_len: int, batch: int = 1, *, dtype=torch.bfloat16, backend: str = "torch",
                            positions: int = 1, per_position: bool = False, expanded_layers: int | None = None
                            ) -> CircuitMemoryEstimate:
    """Estimate the memory of ``attribute`` and of the circuit runs for ``batch`` prompts of ``seq_len`` tokens,
    with the heads' Δ of ``expanded_layers`` layers expanded (default: all; see ``gim_fast.circuits.deltas``)."""
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {seq_len} and {batch}")
    d = Dims.of(config)
    graph = Graph(d.layers, d.q_heads, d.kv_heads)
    b = torch.finfo(dtype).bits // 8
    tokens = batch * seq_len
    hidden = b * tokens * d.hidden                       # one hidden state
    z = b * tokens * d.q_heads * d.head_dim              # one layer's attention output (every head's z)
    post_norm = getattr(config, "model_type", "") in ("gemma2", "gemma3_text")
    record = hidden + d.layers * (z + hidden * (2 if post_norm else 1))
    chunk = min(INPUT_CHUNK, d.q_heads)
    expanded = d.layers if expanded_layers is None else max(0, min(expanded_layers, d.layers))
    compact = d.layers - expanded
    delta_parts = {
        f"node differences Δ, {expanded} layers expanded": graph.upstream(expanded) * hidden,
        f"node differences Δ, {compact} layers compact": compact * (z + hidden),
        "one layer's heads expanded on demand": (d.q_heads * hidden) if compact else 0,
    }
    forward = estimate_memory(config, seq_len, batch, dtype=dtype, backend=backend, checkpointing=False,
                              num_targets=positions)
    scores = 4 * graph.n_sources * graph.n_inputs * (seq_len if per_position else 1)
    est = CircuitMemoryEstimate()
    est.scoring = {
        "clean forward and backward (as an attribution)": forward.total,
        "recorded node outputs, clean and corrupt": 2 * record,
        "input-norm inputs of every layer": d.layers * hidden,
        **delta_parts,
        f"input gradients, {INPUT_CHUNK} inputs at a time (transient)": 4 * 4 * chunk * tokens * d.hidden
        + 4 * 16 * tokens * d.hidden,
        "scores": scores,
    }
    est.patching = {
        "corrupt run's node outputs": record,
        **delta_parts,
        f"residual reads, {INPUT_CHUNK} inputs at a time (transient)": 4 * chunk * hidden,
        "forward working set (one layer)": forward.layer_saved,
    }
    return est


def _free(model) -> int:
    return int(_HEADROOM * available_memory(model.get_input_embeddings().weight.device))


def delta_layers(model, graph: Graph, tokens: int, *, positions: int = 1) -> int:
    """How many layers can keep their heads' Δ expanded in the free memory (all of them when it fits)."""
    weight = model.get_input_embeddings().weight
    compact = estimate_circuit_memory(model.config, tokens, 1, dtype=weight.dtype, positions=positions,
                                      expanded_layers=0).total
    per_layer = (graph.heads + 1) * tokens * Dims.of(model.config).hidden * (torch.finfo(weight.dtype).bits // 8)
    return max(0, min(graph.layers, (_free(model) - compact) // per_layer))


def check_circuit_memory(model, seq_len: int, batch: int, *, positions: int = 1, per_position: bool = False) -> None:
    """Raise ``InsufficientMemoryError`` (with the estimate and the fix) when a batch cannot fit even with every
    layer's Δ compact."""
    weight = model.get_input_embeddings().weight
    est = estimate_circuit_memory(model.config, seq_len, batch, dtype=weight.dtype, positions=positions,
                                  per_position=per_position, expanded_layers=0)
    free = available_memory(weight.device)
    if est.total > _HEADROOM * free:
        raise InsufficientMemoryError(
            f"circuit discovery needs at least {format_bytes(est.total)} on {weight.device} for a batch of {batch} "
            f"prompts × {seq_len} tokens, but only {format_bytes(free)} is free. Use a smaller batch size "
            f"(batch_size=… / --batch-size), shorter prompts, or a device with more memory.\n{est}")
