"""How much memory one attribution needs, estimated from the config before anything runs, and what is free.

The estimate counts what the backward pass keeps alive for an *input-gradient-only* attribution (parameters
frozen, so no weight gradients and no tensors saved for them), per decoder layer and element size b:

    attention   q, k, v as the attention saves them          b·B·S·(Hq + 2·Hkv)·D
                the per-row log-sum-exps (plain, temperature) 8·B·Hq·S
                eager backend only: the S×S scores, P, P_T    12·B·Hq·S²
                triton backend only: O and O_T (float32)      (b + 4)·B·S·Hq·D
    gated MLP   act(gate), up and gate (for act's backward)  3·b·B·S·I      (plain MLP: fc output, 1·b·B·S·I)
    attn output / residual / frozen norms: nothing beyond a per-row statistic (weights frozen: dx = dy·W)

Without checkpointing every layer's activations live until the backward reaches it: L × layer. With per-layer
checkpointing only each layer's input is kept (L × b·B·S·H) and one layer is recomputed at a time (+ 1 × layer).
On top: the embeddings (input, baseline, gradient: 3·b·B·S·H), the target logits (4·B·K·V) and the transient
working set of one layer's backward (2·b·B·S·max(I, (Hq + 2·Hkv)·D) plus the row-chunked tiles). For
Llama-3.1-8B in bf16 at 128k tokens: layer ≈ 12.9 GB, checkpoints ≈ 34 GB — it fits one 80 GB GPU with
checkpointing, not without.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# The row-chunked backend's score tiles (see ops.attention_chunked): a few fp32 tiles of 2^24 elements.
_CHUNK_TILES = 6 * (1 << 24) * 4
# explain_answer: below this many cotangents per backward pass, checkpointing (to fit more) is worth its recompute
_SMALL_CHUNK = 4
# Keep this share of the free memory for allocator fragmentation and everything the estimate does not see.
_HEADROOM = 0.9


class InsufficientMemoryError(MemoryError):
    """Raised before the forward pass when the estimated need exceeds the free memory of a device."""


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool

    @classmethod
    def of(cls, config) -> "Dims":
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        return cls(layers=get("num_hidden_layers", "n_layer"), hidden=hidden,
                   intermediate=get("intermediate_size", "n_inner", default=4 * hidden), q_heads=heads,
                   kv_heads=get("num_key_value_heads", default=heads), head_dim=get("head_dim", default=hidden // heads),
                   vocab=get("vocab_size"), gated=getattr(config, "model_type", "") != "gpt2")


@dataclass
class MemoryEstimate:
    """Bytes an attribution needs, per part, and whether checkpointing was assumed."""

    checkpointing: bool
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        lines = [f"estimated memory for one attribution ({'with' if self.checkpointing else 'without'} "
                 "per-layer checkpointing):"]
        lines += [f"  {name:<28} {format_bytes(n):>10}" for name, n in self.parts.items()]
        lines.append(f"  {'total':<28} {format_bytes(self.total):>10}")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_memory(config, seq_len: int, batch: int = 1, *, dtype=torch.bfloat16, backend: str = "torch",
                    checkpointing: bool = False, num_targets: int = 1, layers: int | None = None,
                    cotangents: int = 1) -> MemoryEstimate:
    """Estimate the activation memory of one attribution (the weights, already loaded, are not counted).

    ``layers``: how many decoder layers live on the device in question (default: all of them).
    ``cotangents``: how many cotangents one backward pass pushes at once (``explain_answer``'s chunk): every
    gradient the backward holds, and the input embeddings' gradient, has that many copies.
    """
    d = Dims.of(config)
    n_layers = d.layers if layers is None else layers
    b = torch.finfo(dtype).bits // 8
    tokens = batch * seq_len
    qkv = (d.q_heads + 2 * d.kv_heads) * d.head_dim
    layer = b * tokens * qkv + 8 * tokens * d.q_heads + b * tokens * d.intermediate * (3 if d.gated else 1)
    if backend == "eager":
        layer += 12 * batch * d.q_heads * seq_len * seq_len
    elif backend == "triton":  # the kernel also keeps O (b) and, for the temperature, O_T in float32
        layer += (b + 4) * tokens * d.q_heads * d.head_dim
    parts = {}
    if checkpointing:
        parts["layer inputs (checkpoints)"] = n_layers * b * tokens * d.hidden
        parts["one recomputed layer"] = layer
    else:
        parts[f"activations of {n_layers} layers"] = n_layers * layer
    parts["embeddings and their gradient"] = (2 + cotangents) * b * tokens * d.hidden
    parts["target logits"] = 4 * batch * num_targets * d.vocab
    transient = 2 * cotangents * b * tokens * max(d.intermediate, qkv)
    if backend == "eager":  # each cotangent's dP and dS
        transient += 8 * (cotangents - 1) * batch * d.q_heads * seq_len * seq_len
    else:
        transient += _CHUNK_TILES
    parts["backward working set"] = transient
    return MemoryEstimate(checkpointing, parts)


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free device memory plus PyTorch's cached blocks on
    CUDA; MemAvailable of /proc/meminfo (or free physical pages) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_checkpointing(model, seq_len: int, batch: int, *, backend: str, num_targets: int,
                       checkpointing: bool | str = "auto", cotangents: int = 1) -> bool:
    """Decide whether to checkpoint decoder layers, or raise ``InsufficientMemoryError`` before anything runs.

    Checks every device that holds decoder layers (models sharded with ``device_map`` included).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    per_device: dict[torch.device, int] = {}
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            dev = next(module.parameters()).device
            per_device[dev] = per_device.get(dev, 0) + 1
    if not per_device:
        per_device[model.get_input_embeddings().weight.device] = 0
    dtype = model.get_input_embeddings().weight.dtype
    options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    failures = []
    for ckpt in options:
        worst = None
        for dev, n_layers in per_device.items():
            est = estimate_memory(model.config, seq_len, batch, dtype=dtype, backend=backend, checkpointing=ckpt,
                                  num_targets=num_targets, layers=n_layers, cotangents=cotangents)
            free = available_memory(dev)
            if est.total > _HEADROOM * free:
                worst = (dev, est, free)
                break
        if worst is None:
            return ckpt
        failures.append(worst)
    dev, est, free = failures[-1]
    advice = ["a shorter input", "a smaller batch"]
    if not est.checkpointing:
        advice.append("checkpointing=True (or 'auto')")
    if backend == "eager":
        advice.append("backend='torch' or 'triton' (the eager backend holds S×S matrices)")
    advice.append("a GPU with more memory, or sharding the model over several with device_map='auto'")
    raise InsufficientMemoryError(
        f"this attribution needs about {format_bytes(est.total)} on {dev} but only {format_bytes(free)} is free "
        f"(batch {batch} × {seq_len} tokens, {dtype}). Try {', '.join(advice)}.\n{est}")


def plan_cotangents(model, seq_len: int, batch: int, *, backend: str, num_targets: int, count: int,
                    checkpointing: bool | str = "auto", limit: int | None = None) -> tuple[int, bool]:
    """How many cotangents one backward pass carries (``explain_answer``'s chunk), and whether to checkpoint.

    The largest chunk ≤ ``count`` (and ≤ ``limit``) whose estimate fits. With ``checkpointing="auto"``,
    checkpointing only when without it fewer than ``_SMALL_CHUNK`` cotangents (or ``count``, if smaller) fit and
    with it more do: every backward pass of a checkpointed model recomputes the layers (one forward's cost), which
    only a much larger chunk pays for. Raises ``InsufficientMemoryError`` when not even one cotangent fits.
    """
    top = max(1, min(count, limit or count))

    def largest(ckpt: bool) -> int:
        def fits(chunk: int) -> bool:
            try:
                plan_checkpointing(model, seq_len, batch, backend=backend, num_targets=num_targets,
                                   checkpointing=ckpt, cotangents=chunk)
            except InsufficientMemoryError:
                return False
            return True

        if not fits(1):
            return 0
        lo, hi = 1, top  # the estimate grows with the chunk: bisect for the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    if checkpointing != "auto":
        chunk = largest(bool(checkpointing))
        ckpt = bool(checkpointing)
    else:
        chunk, ckpt = largest(False), False
        if chunk < min(top, _SMALL_CHUNK):
            with_ckpt = largest(True)
            if with_ckpt > chunk:
                chunk, ckpt = with_ckpt, True
    if chunk == 0:  # raises with the estimate, the free memory and the advice
        plan_checkpointing(model, seq_len, batch, backend=backend, num_targets=num_targets,
                           checkpointing=checkpointing, cotangents=1)
        raise AssertionError("unreachable: one cotangent did not fit, yet the plan passed")
    return chunk, ckpt
