"""The computational graph of a decoder-only transformer, as circuit discovery sees it, and circuits in it.

Nodes (the *sources*) are the input embedding, every attention head and every MLP; a node's output is its additive
contribution to the residual stream (a head's: its slice of the output projection applied to its attention output).
Every downstream node reads the sum of its upstream nodes' outputs through one of its *inputs* (the destinations):
a query input per query head, a key and a value input per key/value head (GQA kept grouped: the key input of
key/value head g feeds every query head of its group), one input per MLP, and the logits. An edge joins a node to an
input it feeds: the embedding and every node of an earlier layer feed every input of a layer; the heads of a layer
also feed that layer's MLP (attention runs first); every node feeds the logits.

Names follow the MIB circuit track: ``input``, ``a3.h5``, ``m3``; inputs ``a3.h5<q>``, ``a3.kv1<k>`` (``a3.h1<k>``
without grouping), ``m3``, ``logits``; an edge is ``src->dst``.

A circuit is a boolean matrix ``[sources, inputs]`` (True = the edge is kept), restricted to real edges. ``top_edges``
and ``top_nodes`` build them from scores the way the MIB benchmark does, ``prune`` removes what cannot matter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory import Dims
from .layout import layout_of

__all__ = ["Graph", "PERCENTAGES"]

# The MIB circuit track's circuit sizes, in percent of the scored edges (or nodes).
PERCENTAGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass(frozen=True)
class Graph:
    """Nodes, inputs and edges of a model with ``layers`` layers of ``heads`` query heads and ``kv_heads``
    key/value heads (see the module docstring)."""

    layers: int
    heads: int
    kv_heads: int
    sources: list[str] = field(init=False, repr=False)
    inputs: list[str] = field(init=False, repr=False)
    real: torch.Tensor = field(init=False, repr=False)     # [sources, inputs] bool: the edges
    owner: torch.Tensor = field(init=False, repr=False)    # [sources, inputs] bool: node n reads through input i

    def __post_init__(self):
        if self.layers < 1 or self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"a graph needs layers >= 1 and heads a multiple of kv_heads >= 1, got layers="
                             f"{self.layers}, heads={self.heads}, kv_heads={self.kv_heads}")
        grouped = self.kv_heads != self.heads
        kv = "kv" if grouped else "h"
        sources = ["input"]
        inputs = []
        for layer in range(self.layers):
            sources += [f"a{layer}.h{h}" for h in range(self.heads)] + [f"m{layer}"]
            inputs += [f"a{layer}.h{h}<q>" for h in range(self.heads)]
            inputs += [f"a{layer}.{kv}{g}<k>" for g in range(self.kv_heads)]
            inputs += [f"a{layer}.{kv}{g}<v>" for g in range(self.kv_heads)]
            inputs.append(f"m{layer}")
        inputs.append("logits")
        n_src, n_in = len(sources), len(inputs)
        real = torch.zeros(n_src, n_in, dtype=torch.bool)
        owner = torch.zeros(n_src, n_in, dtype=torch.bool)
        group = self.heads // self.kv_heads
        for layer in range(self.layers):
            upstream = self.upstream(layer)
            q = self.query_inputs(layer)
            real[:upstream, q.start:self.mlp_input(layer)] = True
            real[:upstream + self.heads, self.mlp_input(layer)] = True
            first = self.head_node(layer, 0)
            for h in range(self.heads):
                owner[first + h, q.start + h] = True
                owner[first + h, self.key_inputs(layer).start + h // group] = True
                owner[first + h, self.value_inputs(layer).start + h // group] = True
            owner[self.mlp_node(layer), self.mlp_input(layer)] = True
        real[:, -1] = True
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "owner", owner)

    # ---------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config) -> "Graph":
        """The graph of a Hugging Face config (no model needed: e.g. to count the edges of an 8B model)."""
        d = Dims.of(config)
        return cls(d.layers, d.q_heads, d.kv_heads)

    @classmethod
    def from_model(cls, model) -> "Graph":
        """The graph of a Hugging Face causal LM of a supported family (a clear error for any other)."""
        layout = layout_of(model)
        return cls(len(layout.layers), layout.heads, layout.kv_heads)

    # ---------------------------------------------------------------------------------------------- indices

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_edges(self) -> int:
        return int(self.real.sum())

    @property
    def inputs_per_layer(self) -> int:
        return self.heads + 2 * self.kv_heads + 1

    def upstream(self, layer: int) -> int:
        """How many nodes come before ``layer`` (the embedding and every node of earlier layers): the first rows."""
        return 1 + layer * (self.heads + 1)

    def head_node(self, layer: int, head: int) -> int:
        return self.upstream(layer) + head

    def mlp_node(self, layer: int) -> int:
        return self.upstream(layer) + self.heads

    def is_head(self, node: int) -> bool:
        return node > 0 and (node - 1) % (self.heads + 1) != self.heads

    def query_inputs(self, layer: int) -> range:
        start = layer * self.inputs_per_layer
        return range(start, start + self.heads)

    def key_inputs(self, layer: int) -> range:
        start = layer * self.inputs_per_layer + self.heads
        return range(start, start + self.kv_heads)

    def value_inputs(self, layer: int) -> range:
        start = layer * self.inputs_per_layer + self.heads + self.kv_heads
        return range(start, start + self.kv_heads)

    def mlp_input(self, layer: int) -> int:
        return (layer + 1) * self.inputs_per_layer - 1

    @property
    def logits_input(self) -> int:
        return self.n_inputs - 1

    def edge_index(self) -> torch.Tensor:
        """``[n_edges, 2]`` (source, input) of every edge, row-major (by source, then input)."""
        return self.real.nonzero()

    def edge_names(self) -> list[str]:
        return [f"{self.sources[s]}->{self.inputs[i]}" for s, i in self.edge_index().tolist()]

    def __str__(self) -> str:
        kv = (f", {self.kv_heads} key/value head{'s' if self.kv_heads > 1 else ''}"
              if self.kv_heads != self.heads else "")
        return (f"{self.n_sources} nodes (the embedding, {self.layers}×{self.heads} heads{kv}, {self.layers} MLPs) "
                f"+ the logits; {self.n_inputs} inputs ({self.layers}×({self.heads} q + {self.kv_heads} k + "
                f"{self.kv_heads} v + 1 MLP) + the logits); {self.n_edges:,} edges")

    # ---------------------------------------------------------------------------------------------- circuits

    def full(self) -> torch.Tensor:
        """The circuit with every edge."""
        return self.real.clone()

    def empty(self) -> torch.Tensor:
        return torch.zeros_like(self.real)

    def top_edges(self, scores: torch.Tensor, count: int, *, absolute: bool = False, prune: bool = True
                  ) -> torch.Tensor:
        """The ``count`` highest-scoring edges (by ``|score|`` with ``absolute``), then pruned; ties keep the
        first edge in ``edge_index`` order."""
        self._check_count(count, self.n_edges, "edges")
        values = scores[self.real].float()
        if absolute:
            values = values.abs()
        order = torch.argsort(-values, stable=True)[:count]
        keep = torch.zeros(self.n_edges, dtype=torch.bool)
        keep[order] = True
        circuit = self.empty()
        circuit[self.real] = keep
        return self.prune(circuit) if prune else circuit

    def top_nodes(self, node_scores: torch.Tensor, count: int, *, absolute: bool = False, prune: bool = True
                  ) -> torch.Tensor:
        """The circuit of the ``count`` highest-scoring nodes: every edge from a kept node to an input of a kept
        node (a key/value input is kept with any head of its group) or to the logits; then pruned."""
        self._check_count(count, self.n_sources, "nodes")
        values = node_scores.float().abs() if absolute else node_scores.float()
        nodes = torch.zeros(self.n_sources, dtype=torch.bool)
        nodes[torch.argsort(-values, stable=True)[:count]] = True
        alive = self._alive_inputs(nodes)
        circuit = self.real & nodes[:, None] & alive[None, :]
        return self.prune(circuit) if prune else circuit

    def prune(self, circuit: torch.Tensor) -> torch.Tensor:
        """Remove, until nothing changes, the nodes without an incoming edge (the embedding excepted) or without
        an outgoing one, and the edges from or into a removed node (the MIB benchmark's ``Graph.prune``)."""
        circuit = circuit & self.real
        while True:
            has_out = circuit.any(1)
            has_in = (self.owner & circuit.any(0)[None, :]).any(1)
            has_in[0] = True
            nodes = has_out & has_in
            pruned = circuit & nodes[:, None] & self._alive_inputs(nodes)[None, :]
            if torch.equal(pruned, circuit):
                return circuit
            circuit = pruned

    def _alive_inputs(self, nodes: torch.Tensor) -> torch.Tensor:
        alive = (self.owner & nodes[:, None]).any(0)
        alive[self.logits_input] = True
        return alive

    @staticmethod
    def _check_count(count: int, total: int, what: str) -> None:
        if not 0 <= count <= total:
            raise ValueError(f"asked for {count} {what}, but the graph has {total}")

    def nodes_in(self, circuit: torch.Tensor) -> torch.Tensor:
        """``[sources]`` bool: the nodes with an edge in ``circuit``."""
        return circuit.any(1)
