"""How much memory circuit discovery needs, estimated from the config before anything runs.

Two phases, never alive together; the estimate is the larger (weights, already loaded, are not counted). With
T = batch × tokens, b the element size, N the nodes (1 + L·(heads + 1)), H the hidden size:

scoring (one batch of ``attribute``):
    the clean forward and its input-gradient backward      as ``gim_fast.estimate_memory`` (no checkpointing)
    recorded node outputs, clean and corrupt                2 · b · T · (H + L·(heads·D + H)) (+ L·T·H post-norm inputs)
    the layers' input-norm inputs                           b · T · L · H
    node differences Δ                                      b · N · T · H
    one layer's input gradients (transient)                 4 · 4 · heads · T · H  (the per-head cotangents through
                                                            the norm, in float32) + a 16-row float32 slice of Δ
    the scores                                              4 · N · inputs (· S per position)
patching (one circuit run, no gradient):
    the corrupt run's node outputs                          b · T · (H + L·(heads·D + H))
    this run's node differences Δ                           b · N · T · H
    one layer's per-input residual reads and their norms    2 · b · (heads + 2·kv_heads) · T · H, and their
                                                            corrections (the same again)
    the forward working set (one layer, no gradient)        as one layer of ``estimate_memory``

For Llama-3.1-8B in bf16, 64 prompts × 32 tokens: N = 1057, Δ = 17.7 GB, the backward's activations ≈ 12 GB —
about 36 GB in all with the 16 GB of weights: one 80 GB GPU (``python -m gim_fast.circuits.memory``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory import Dims, InsufficientMemoryError, available_memory, estimate_memory, format_bytes
from .graph import Graph

__all__ = ["CircuitMemoryEstimate", "estimate_circuit_memory", "check_circuit_memory"]

_HEADROOM = 0.9   # use at most this share of the free memory


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
                            positions: int = 1, per_position: bool = False) -> CircuitMemoryEstimate:
    """Estimate the memory of ``attribute`` and of the circuit runs for ``batch`` prompts of ``seq_len`` tokens."""
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {seq_len} and {batch}")
    d = Dims.of(config)
    graph = Graph(d.layers, d.q_heads, d.kv_heads)
    b = torch.finfo(dtype).bits // 8
    tokens = batch * seq_len
    post_norm = getattr(config, "model_type", "") in ("gemma2", "gemma3_text")
    record = b * tokens * (d.hidden + d.layers * (d.q_heads * d.head_dim + d.hidden * (2 if post_norm else 1)))
    delta = b * graph.n_sources * tokens * d.hidden
    forward = estimate_memory(config, seq_len, batch, dtype=dtype, backend=backend, checkpointing=False,
                              num_targets=positions)
    scores = 4 * graph.n_sources * graph.n_inputs * (seq_len if per_position else 1)
    est = CircuitMemoryEstimate()
    est.scoring = {
        "clean forward and backward (as an attribution)": forward.total,
        "recorded node outputs, clean and corrupt": 2 * record,
        "input-norm inputs of every layer": b * tokens * d.layers * d.hidden,
        f"node differences Δ ({graph.n_sources} nodes)": delta,
        "one layer's input gradients (transient)": 4 * 4 * d.q_heads * tokens * d.hidden + 4 * 16 * tokens * d.hidden,
        "scores": scores,
    }
    one_layer = next(v for k, v in forward.parts.items() if k.startswith("activations")) // d.layers
    reads = (d.q_heads + 2 * d.kv_heads) * tokens * d.hidden * b
    est.patching = {
        "corrupt run's node outputs": record,
        f"node differences Δ ({graph.n_sources} nodes)": delta,
        "one layer's residual reads, norms, corrections": 4 * reads,
        "forward working set (one layer)": one_layer,
    }
    return est


def check_circuit_memory(model, seq_len: int, batch: int, *, positions: int = 1, per_position: bool = False) -> None:
    """Raise ``InsufficientMemoryError`` (with the estimate and the fix) when a batch cannot fit."""
    weight = model.get_input_embeddings().weight
    est = estimate_circuit_memory(model.config, seq_len, batch, dtype=weight.dtype, positions=positions,
                                  per_position=per_position)
    free = available_memory(weight.device)
    if est.total > _HEADROOM * free:
        raise InsufficientMemoryError(
            f"circuit discovery needs about {format_bytes(est.total)} on {weight.device} for a batch of {batch} "
            f"prompts × {seq_len} tokens, but only {format_bytes(free)} is free. Use a smaller batch size "
            f"(batch_size=… / --batch-size), shorter prompts, or a device with more memory.\n{est}")


if __name__ == "__main__":   # run from the repository root: the estimate of the README (bench/configs.py's config)
    from transformers import AutoConfig

    from bench.configs import CONFIGS

    model_type, kwargs = CONFIGS["llama-3.1-8b"]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    print(f"Llama-3.1-8B: {Graph.from_config(cfg)}")
    print(estimate_circuit_memory(cfg, 32, 64, dtype=torch.bfloat16))
