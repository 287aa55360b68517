"""How much memory one attribution needs, estimated from the config before anything runs, and what is free.

The estimate counts the tensors alive at the peak of an *input-gradient-only* attribution (parameters frozen:
no weight gradients, nothing saved for them) and adds what the allocator and the framework add on top. With
B·S = N tokens, model element size b, attention math element size c (4; 8 for float64), hidden H, MLP width I,
Hq/Hkv heads of dim D:

    saved by each layer   attention (torch)    q, k, v after RoPE, float32 LSE   b·N·(Hq + 2·Hkv)·D + 4·N·Hq
                          attention (triton)   + O (b), O_T (float32), LSE, LSE_T
                                                                                 (b + 4)·N·Hq·D + 8·N·Hq
                          attention (eager)    q, repeated k and v (float32), the masked scores and P (and
                                               the soft-cap's tanh), the mask
                                                                      3·c·N·Hq·D + 2·c·B·Hq·S² + B·S²
                          gated MLP            gate, act(gate), up               3·b·N·I   (GPT-2's MLP: 4·b·N·I)
                          frozen norms         one statistic per row (nothing for dx = dy·W: weights frozen)
    one layer's backward  the MLP phase        ∂ of down's input, of act, of up  3·b·N·I
                          the attention phase  (after the layer's MLP tensors were freed) torch: the row-tiled
                                               GIM backward, float32 dQ/dK/dV, their scaled copies, K/V in
                                               float32 and four score tiles (five with soft-capping), or torch's
                                               fused backward where it may run instead (the plain gradient:
                                               4·b·N·(Hq + 2·Hkv)·D + float32 dQ), whichever is larger;
                                               eager: three more S×S matrices
                          + the gradient flowing down the residual stream, b·N·H; × ``cotangents`` when M
                          cotangents are pushed back at once
    inputs                the embeddings, the baseline's and (× cotangents) their gradient: (2 + M)·b·N·H

Without checkpointing every layer's saved tensors live until the backward reaches it, and the peak is inside
the first layer's backward: L × saved + one backward. With per-layer checkpointing only each layer's input is
kept (L·b·N·H) and one layer is recomputed at a time: + 1 × saved + one backward. ``bench/memory.py --tensors``
compares these counts with the tensor bytes a dispatch-mode tracker sees (docs/memory.md).

The margin on top of the tensors, by device (docs/memory.md has the measurements):

* CPU: glibc's ``malloc`` serves blocks below its dynamic mmap threshold (at most 32 MiB) from a heap that keeps
  what is freed and fragments. ``explain`` hands freed heap memory back after every decoder layer and each of its
  sub-modules (``integration.released_heap``), which leaves ``_CPU_FACTOR`` × the tensors, plus up to
  ``_HEAP_HOLES`` holes the size of the largest heap-sized tensor between two trims, plus ``_FRAMEWORK`` for
  what the first call loads (BLAS buffers, oneDNN kernels, code pages); with reduced-precision weights, where
  gim_fast's own attention code (eager, row-chunked) computes in float32, ``_CAST_HOLES`` × float32 Q, K, V (+
  ``_CAST_FIXED`` for the eager backend). Without glibc nothing is handed back: tensors under the threshold count ``_HEAP_FACTOR`` times.
* CUDA: the caching allocator rounds every block up (to 512 B, or 2 MiB segments) and cuBLAS keeps a workspace:
  ``_CUDA_FACTOR`` × the tensors + ``_FRAMEWORK`` (not yet checked against a GPU).

For Llama-3.1-8B in bf16 at 128k tokens: checkpoints 32 GiB, one recomputed layer 12 GiB and its backward
11.5 GiB, inputs 3 GiB: 58.5 GiB of tensors, with checkpointing; 400 GiB without.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .integration.heap import can_release_heap
from .ops.attention_chunked import auto_chunk_size

# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): smaller blocks come from the heap.
_HEAP_BLOCK = 32 << 20
# CPU, with freed heap memory handed back between modules (integration.released_heap, glibc): resident bytes per
# byte of tensors, plus this many of the largest heap-sized tensor (holes the heap cannot reuse between two
# trims), plus what the first call loads (BLAS buffers, oneDNN kernels, code pages). Calibrated on the grid of
# bench/memory.py: SmolLM2-135M, Gemma-3-270M and two Llama-3.1-8B layers, 512–8k tokens (docs/memory.md).
_CPU_FACTOR = 1.05
_HEAP_HOLES = 4
_FRAMEWORK = 28 << 20
# CPU, attention math in float32 on reduced-precision inputs by gim_fast's own code (the eager backend, the torch
# backend's row-chunked path): its float32 copies and results, allocated and freed inside one module (no trim
# between), leave holes: this many times float32 Q, K and V, plus _CAST_FIXED for the eager backend (the torch
# backend's row tiles need no fixed part). Calibrated on bench/memory.py's grid (docs/memory.md).
_CAST_HOLES = 3
_CAST_FIXED = 16 << 20
# CPU without malloc_trim (not glibc): the heap keeps its high-water mark; tensors under _HEAP_BLOCK may cost twice.
_HEAP_FACTOR = 2.0
# CUDA: the caching allocator's rounding (512 B blocks, 2 MiB segments) and the cuBLAS workspace.
_CUDA_FACTOR = 1.05
# explain_answer: below this many cotangents per backward pass, checkpointing (to fit more) is worth its recompute
_SMALL_CHUNK = 4
# Keep this share of the free memory for everything else on the machine.
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
    softcap: bool
    sliding_window: int | None

    @classmethod
    def of(cls, config) -> "Dims":
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        # Qwen2's configs carry a sliding_window they do not use (use_sliding_window=False); Gemma's leave it None
        window = None if getattr(config, "use_sliding_window", None) is False else get("sliding_window")
        return cls(layers=get("num_hidden_layers", "n_layer"), hidden=hidden,
                   intermediate=get("intermediate_size", "n_inner", default=4 * hidden), q_heads=heads,
                   kv_heads=get("num_key_value_heads", default=heads),
                   head_dim=get("head_dim", default=hidden // heads),
                   vocab=get("vocab_size"), gated=getattr(config, "model_type", "") != "gpt2",
                   softcap=bool(get("attn_logit_softcapping")), sliding_window=window)


# A group of tensors: (bytes of one tensor, how many); a negative count is memory freed before a phase.
Tensors = list[tuple[int, int]]


def _bytes(group: Tensors) -> int:
    return sum(size * count for size, count in group)


def _heap_bytes(group: Tensors) -> int:
    return sum(size * count for size, count in group if size < _HEAP_BLOCK)


def _scaled(group: Tensors, factor: int) -> Tensors:
    return [(size, count * factor) for size, count in group]


@dataclass
class MemoryEstimate:
    """Bytes an attribution needs, per part (the last part is the allocator and framework margin), and
    whether checkpointing was assumed. ``tensors`` is the sum without the margin; ``layer_saved`` what one decoder
    layer keeps for its backward (a forward's working set per layer)."""

    checkpointing: bool
    parts: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    layer_saved: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        lines = [f"estimated memory for one attribution ({'with' if self.checkpointing else 'without'} "
                 "per-layer checkpointing):"]
        lines += [f"  {name:<40} {format_bytes(n):>10}" for name, n in self.parts.items()]
        lines.append(f"  {'total':<40} {format_bytes(self.total):>10}")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _layer_saved(d: Dims, batch: int, seq: int, b: int, c: int, backend: str) -> Tensors:
    """What one decoder layer keeps for its backward."""
    n = batch * seq
    saved = [(4 * n, 4), (4 * n * (d.q_heads + d.kv_heads), 1)]  # norm statistics (also per-head q/k norms)
    if backend == "eager":
        saved += [(c * n * d.q_heads * d.head_dim, 3), (c * batch * d.q_heads * seq * seq, 4 if d.softcap else 2),
                  (batch * seq * seq, 1)]
    else:
        saved += [(b * n * d.q_heads * d.head_dim, 1), (b * n * d.kv_heads * d.head_dim, 2), (c * n * d.q_heads, 1)]
        if backend == "triton":
            saved += [(b * n * d.q_heads * d.head_dim, 1), (4 * n * d.q_heads * d.head_dim, 1), (4 * n * d.q_heads, 2)]
    saved.append((b * n * d.intermediate, 3 if d.gated else 4))
    return saved


def _cast_holes(d: Dims, batch: int, c: int, backend: str, cotangents: int) -> bool:
    """Whether a 16-bit torch-backend call leaves the heap holes of float32 copies (``_CAST_HOLES``): the calls
    whose forward runs in row tiles too (soft-capping, windows, padded batches) or that push a stack of cotangents
    back do; one unpadded row (the CPU flash forward, then the row-tiled backward) does not (docs/memory.md)."""
    return backend == "torch" and (d.softcap or c == 8 or cotangents > 1 or batch > 1
                                   or d.sliding_window is not None)


def _attention_backward(d: Dims, batch: int, seq: int, b: int, c: int, backend: str, cotangents: int) -> Tensors:
    """The transient tensors of one layer's attention backward."""
    n = batch * seq
    q, kv = n * d.q_heads * d.head_dim, n * d.kv_heads * d.head_dim
    if backend == "eager":  # dP, P_T, dP − rowsum, dS (P itself is freed by then)
        return [(c * batch * d.q_heads * seq * seq, 3)]
    if backend == "triton":
        return [(b * q, 2), (b * kv, 4), (4 * n * d.q_heads, 1)]
    # the row-tiled GIM backward (ops/attention_chunked.attention_backward): float32 dQ/dK/dV and their scaled
    # copies, K/V in float32, the row tiles of Q and dO, and the score-sized tile buffers (S/T then dP, P_T, P,
    # dS; with soft-capping also 1 − tanh²)
    rows = auto_chunk_size(batch, d.q_heads, d.kv_heads, seq, d.sliding_window)
    keys = seq if d.sliding_window is None else min(seq, d.sliding_window + rows)
    tiled = [(c * q, 2), (c * kv, 4), (b * q, 1), (b * kv, 2), (c * batch * d.kv_heads * keys * d.head_dim, 2),
             (c * batch * d.q_heads * rows * keys, 5 if d.softcap else 4)]
    if d.softcap or c == 8 or cotangents > 1:  # never torch's fused backward
        return tiled
    # torch's fused backward (the plain gradient after the CPU flash forward): dO, dQ/dK/dV, their copies, a
    # float32 dQ accumulator; the estimate does not know the temperature, so the larger of the two
    fused = [(b * q, 4), (b * kv, 8), (4 * q, 1)]
    return max(fused, tiled, key=_bytes)


def estimate_memory(config, seq_len: int, batch: int = 1, *, dtype=torch.bfloat16, backend: str = "torch",
                    checkpointing: bool = False, num_targets: int = 1, layers: int | None = None,
                    cotangents: int = 1, device: str | torch.device = "cpu") -> MemoryEstimate:
    """Estimate the memory one attribution needs on top of the loaded weights; never an under-estimate.

    ``config``: a Hugging Face config; ``dtype``: the model's; ``backend``: the attention backend that runs
    (``"torch"``, ``"eager"``, ``"triton"``); ``checkpointing``: per-layer activation checkpointing;
    ``num_targets``: target positions per row (their logits are kept); ``layers``: how many decoder layers live
    on the device in question (default: all of them); ``cotangents``: how many cotangents one backward pushes
    back at once (it scales the backward's working set and the input gradient); ``device``: where it runs (the
    allocator margin differs between the CPU and CUDA). See the module docstring for what is counted.
    """
    if cotangents < 1:
        raise ValueError(f"cotangents must be a positive int, got {cotangents!r}")
    d = Dims.of(config)
    n_layers = d.layers if layers is None else layers
    b = torch.finfo(dtype).bits // 8
    c = 8 if dtype == torch.float64 else 4
    n = batch * seq_len
    residual = [(b * n * d.hidden, 1)]

    saved = _layer_saved(d, batch, seq_len, b, c, backend)
    mlp_saved = [saved[-1]]
    phases = {
        "MLP": [(b * n * d.intermediate, 3 if d.gated else 4)] + residual,
        "attention": (_attention_backward(d, batch, seq_len, b, c, backend, cotangents) + _scaled(mlp_saved, -1)
                      + residual),
        "head": [(b * n * d.hidden, 1), (4 * n * d.hidden, 2)],  # the final norm's backward, in float32
    }
    phase = max(phases, key=lambda k: _bytes(phases[k]))
    work = _scaled(phases[phase], cotangents)

    groups: dict[str, Tensors] = {}
    if checkpointing:
        groups["layer inputs (checkpoints)"] = _scaled(residual, n_layers)
        groups["one recomputed layer"] = saved
    else:
        groups[f"saved activations, {n_layers} layers"] = _scaled(saved, n_layers)
    groups[f"one layer's backward ({phase} phase" + (f", × {cotangents})" if cotangents > 1 else ")")] = work
    groups["inputs, baseline, input gradient"] = _scaled(residual, 2 + cotangents)
    groups["target logits and their gradient"] = [(4 * batch * num_targets * d.vocab, 4)]

    parts = {name: _bytes(group) for name, group in groups.items()}
    tensors = sum(parts.values())
    device = torch.device(device)
    if device.type == "cpu":
        heap_sizes = [size for group in groups.values() for size, count in group if count > 0 and size < _HEAP_BLOCK]
        margin = (_CPU_FACTOR - 1) * tensors + _HEAP_HOLES * max(heap_sizes, default=0) + _FRAMEWORK
        if b < c and (backend == "eager" or _cast_holes(d, batch, c, backend, cotangents)):
            margin += (_CAST_HOLES * c * n * (d.q_heads + 2 * d.kv_heads) * d.head_dim
                       + (_CAST_FIXED if backend == "eager" else 0))
        if not can_release_heap():
            margin += (_HEAP_FACTOR - 1) * sum(_heap_bytes(group) for group in groups.values())
        parts["allocator (CPU heap) and framework"] = int(margin)
    else:
        parts[f"allocator ({device.type}) and framework"] = int((_CUDA_FACTOR - 1) * tensors) + _FRAMEWORK
    return MemoryEstimate(checkpointing, parts, tensors, _bytes(saved))


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
                                  num_targets=num_targets, layers=n_layers, cotangents=cotangents, device=dev)
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
