"""Attention masks built from structure (causal, sliding window, key padding), one tile at a time.

No function here builds an S×S mask for the whole sequence: callers ask for the tile of query rows
``[q_start, q_end)`` against key columns ``[k_start, k_end)`` they are about to compute.
"""
from __future__ import annotations

import torch


def key_range(q_start: int, q_end: int, seq_len: int, causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """Key columns ``[lo, hi)`` that query rows ``[q_start, q_end)`` may attend to at all.

    ``sliding_window = w`` keeps keys j with ``i - w < j <= i`` (transformers' convention).
    """
    hi = q_end if causal else seq_len
    lo = max(0, q_start - sliding_window + 1) if sliding_window is not None else 0
    return lo, hi


def allowed_tile(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    *,
    causal: bool,
    sliding_window: int | None,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, q_end-q_start, k_end-k_start]``: True where query i may attend to key j."""
    i = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_start, k_end, device=device)[None, :]
    allowed = torch.ones(q_end - q_start, k_end - k_start, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if sliding_window is not None:
        allowed &= j > i - sliding_window
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, k_start:k_end].to(device)
    return allowed
