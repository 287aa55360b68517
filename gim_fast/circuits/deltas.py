"""Δ: every node's output difference (clean − corrupt when scoring; this run's − corrupt in a circuit run), layer
by layer.

Rows follow the graph's sources: the embedding, then per layer its heads and its MLP. The embedding's and the
MLPs' rows are hidden-size vectors; a layer's heads are kept either expanded (``[heads, B, S, H]``, each head's
contribution to the residual stream) or compact (the difference of the output projection's input, ``[B, S,
heads·head_dim]``: the size of one hidden state) and expanded when asked for. The first ``expanded_layers``
layers live expanded in one contiguous buffer (an input's contraction over them is one matrix product); later
ones are expanded on demand, one layer at a time. With every layer expanded this is the ``[nodes, positions,
hidden]`` tensor of EAP-IG; with none, Δ costs two hidden states per layer and each use of a layer's heads one
output-projection product — what lets long prompts on big models fit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .graph import Graph

__all__ = ["NodeDeltas"]


class NodeDeltas:
    """Δ rows of one batch, filled in source order (``set_embedding``, then per layer ``set_heads`` and
    ``set_mlp``). ``expand(layer, z_difference) -> [heads, B, S, H]``. ``differentiable``: keep every block as
    given (autograd through them; for reference computations)."""

    def __init__(self, graph: Graph, expand: Callable[[int, torch.Tensor], torch.Tensor], expanded_layers: int,
                 *, differentiable: bool = False):
        self.graph, self.expand = graph, expand
        self.expanded_layers = max(0, min(expanded_layers, graph.layers))
        self.differentiable = differentiable
        self.prefix: torch.Tensor | None = None     # the expanded rows of the first expanded_layers layers
        self.compact: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.blocks: list[torch.Tensor] = []        # differentiable mode: every row block, in order

    @property
    def prefix_rows(self) -> int:
        return self.graph.upstream(self.expanded_layers)

    def set_embedding(self, delta: torch.Tensor) -> None:
        if self.differentiable:
            self.blocks.append(delta.unsqueeze(0))
            return
        self.prefix = delta.new_empty((self.prefix_rows, *delta.shape))
        self.prefix[0] = delta

    def set_heads(self, layer: int, z_delta: torch.Tensor) -> None:
        first = self.graph.head_node(layer, 0)
        if self.differentiable:
            self.blocks.append(self.expand(layer, z_delta))
        elif layer < self.expanded_layers:
            self.prefix[first:first + self.graph.heads] = self.expand(layer, z_delta)
        else:
            self.compact[layer] = z_delta

    def set_mlp(self, layer: int, delta: torch.Tensor) -> None:
        if self.differentiable:
            self.blocks.append(delta.unsqueeze(0))
        elif layer < self.expanded_layers:
            self.prefix[self.graph.mlp_node(layer)] = delta
        else:
            self.mlp[layer] = delta

    # -------------------------------------------------------------------------------------------- reading
    def pieces(self, rows: int) -> list[tuple[int, torch.Tensor]]:
        """``(first row, block [n, B, S, H])`` pieces that together hold rows ``0 … rows−1``, in order."""
        if self.differentiable:
            return [(0, torch.cat(self.blocks)[:rows])]
        out = [(0, self.prefix[:min(rows, self.prefix_rows)])]
        for layer in range(self.expanded_layers, self.graph.layers):
            first = self.graph.head_node(layer, 0)
            if first >= rows:
                break
            out.append((first, self.expand(layer, self.compact[layer])[:rows - first]))
            if first + self.graph.heads < rows:
                out.append((first + self.graph.heads, self.mlp[layer].unsqueeze(0)))
        return out

    def heads(self, layer: int) -> torch.Tensor:
        """The expanded rows of ``layer``'s heads, ``[heads, B, S, H]``."""
        first = self.graph.head_node(layer, 0)
        if self.differentiable:
            return torch.cat(self.blocks)[first:first + self.graph.heads]
        if layer < self.expanded_layers:
            return self.prefix[first:first + self.graph.heads]
        return self.expand(layer, self.compact[layer])

    def gather(self, index: list[int]) -> torch.Tensor:
        """Rows ``index`` (ascending), ``[len(index), B, S, H]``."""
        if self.differentiable:
            return torch.cat(self.blocks)[index]
        graph, cut = self.graph, self.prefix_rows
        parts = []
        inside = [r for r in index if r < cut]
        if inside:
            parts.append(self.prefix[inside])
        for layer in range(self.expanded_layers, graph.layers):
            first = graph.head_node(layer, 0)
            heads = [r - first for r in index if first <= r < first + graph.heads]
            if heads:
                parts.append(self.expand(layer, self.compact[layer])[heads])
            if graph.mlp_node(layer) in index:
                parts.append(self.mlp[layer].unsqueeze(0))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
