"""Running a circuit: the model on the clean prompts with every edge outside the circuit patched.

Each input v of the graph reads, instead of the residual stream, the outputs of its in-circuit parents as they are
in this (patched) run plus the corrupt outputs of its other parents:

    in_v = x − Σ_{u → v not in the circuit} (a_u(this run) − a_u(corrupt))

x the residual stream where v reads it (the sum of every upstream output in this run, plus the biases), or,
equally, the corrupt run's residual at that point plus the kept parents' differences: each group of inputs is
built from the side with fewer differences to read. With every edge kept nothing is patched and the run is the
clean one, bit for bit; with none every input reads the corrupt run's residual and the run is the corrupt one, bit
for bit. For Gemma 2/3 the heads of a layer reach the residual stream through the attention's post-norm, which is
not additive: an input that reads some heads of layer l from the corrupt run gets that layer's contribution
recomputed, ``post_norm(A − Σ_{patched heads} Δa_h)``, A the layer's attention output in this run (as the EAP-IG
code does for Gemma).

How: per instance and restored on exit, the layer's input norm is swapped for one that builds each query, key and
value input's own residual read and projects it with that head's weight slice (the projections' forwards return
these), the MLP's norm and the final norm for ones that build their input's read, and hooks record each node's
output as the run goes (Δ rows are filled layer by layer, ``gim_fast.circuits.deltas``; a group of inputs costs one
matrix product over its upstream nodes). ``weights`` may be a float matrix that requires grad (1 = kept): the run
is then differentiable in it, and ∂m/∂w(u → v) at w = 1 is exactly the attribution-patching score of the edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integration import ModelState, eval_mode, frozen_parameters
from .attribution import record_outputs
from .deltas import NodeDeltas
from .graph import Graph
from .layout import Layout, layout_of
from .memory import INPUT_CHUNK, delta_layers
from .tasks import Task, task_metric

__all__ = ["CorruptRun", "run_circuit", "circuit_metric", "patched_forward", "edge_effects"]


class CorruptRun(dict):
    """The node outputs of the corrupt prompts (``record_outputs``), recorded once per batch and reused by every
    circuit run on that batch."""

    @classmethod
    def of(cls, model, layout: Layout, corrupt_ids: torch.Tensor) -> "CorruptRun":
        run = cls()
        with torch.no_grad(), ModelState() as state:
            record_outputs(layout, run, state, reads=True)
            model(input_ids=corrupt_ids, use_cache=False, logits_to_keep=1)
        return run


@dataclass(frozen=True)
class CorruptRead:
    """Every input of a group reads the corrupt run's residual ``value`` (no kept edge)."""

    value: torch.Tensor


class _Patch:
    """The state of one patched forward pass."""

    def __init__(self, layout: Layout, graph: Graph, corrupt: CorruptRun, weights: torch.Tensor,
                 expanded_layers: int):
        self.layout, self.graph, self.corrupt = layout, graph, corrupt
        self.grad = weights.requires_grad
        self.keep = weights.to(corrupt["emb"].dtype)         # 1 where the edge is kept, 0 where it is patched
        self.deltas = NodeDeltas(graph, layout.head_outputs, expanded_layers, differentiable=self.grad)
        self.stash: dict[str, torch.Tensor | None] = {}
        self.attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # post-norm layers: (A, post_norm(A))

    def inputs(self, x: torch.Tensor, upstream: int, cols, read) -> torch.Tensor | None:
        """Each input of ``cols``'s residual read ``[len(cols), B, S, H]``; None when none of them has a patched
        edge (they all read ``x``), or ``CorruptRead`` when none has a kept one (they all read the corrupt run's
        residual, exactly); the last two only in runs without gradient. ``read``: the corrupt run's key of this
        read point.

        Two equal ways: from this run's residual ``x`` minus the patched parents' Δ, or from the corrupt run's
        residual at the same point plus the kept parents' Δ; the one with fewer Δ rows to read is taken (a small
        circuit reads few)."""
        keep = self.keep[:upstream, cols]
        patched = 1 - keep
        if self.grad:
            return self._read(x, patched, -1)
        rows_patched, rows_kept = int(patched.any(1).sum()), int(keep.any(1).sum())
        if rows_patched == 0:
            return None
        if rows_kept == 0:
            return CorruptRead(self.corrupt[read])
        if rows_kept < rows_patched:
            return self._read(self.corrupt[read], keep, +1, corrupt_base=True)
        return self._read(x, patched, -1)

    def _read(self, base: torch.Tensor, weight: torch.Tensor, sign: int, corrupt_base: bool = False) -> torch.Tensor:
        """``base + sign · Σ_u weight[u, c] · Δ_u`` for every column c of ``weight`` ``[upstream, n]``; for
        post-normed heads, each layer's term goes through the norm (this run's or the corrupt run's sum)."""
        graph, heads = self.graph, self.graph.heads
        n_cols, shape = weight.shape[1], base.shape
        post = self.layout.post_norms
        upstream = weight.shape[0]
        direct = weight
        if post:   # heads go through their layer's norm below
            heads_mask = torch.tensor([graph.is_head(r) for r in range(upstream)], device=weight.device)
            direct = weight * ~heads_mask[:, None]
        rows = list(range(upstream)) if self.grad else direct.any(1).nonzero()[:, 0].tolist()
        out = base.unsqueeze(0).expand(n_cols, *shape)
        if rows and 3 * len(rows) < upstream:     # few rows: gather them
            d = self.deltas.gather(rows)
            out = out + sign * (direct[rows].T @ d.reshape(len(rows), -1)).reshape(n_cols, *shape)
        elif rows:                                # many: read Δ in place, the unused rows with weight 0
            total = sum(direct[first:first + len(d)].T @ d.reshape(len(d), -1)
                        for first, d in self.deltas.pieces(upstream))
            out = out + sign * total.reshape(n_cols, *shape)
        if not post:
            return out
        for layer in range(graph.layers):
            first = graph.head_node(layer, 0)
            if first >= weight.shape[0]:
                break
            w = weight[first:first + heads]
            which = w.any(0) if not self.grad else torch.ones(n_cols, dtype=torch.bool, device=base.device)
            if not bool(which.any()):
                continue
            a, normed = (self.corrupt[("A", layer)], self.corrupt[("P", layer)]) if corrupt_base else self.attn[layer]
            d = self.deltas.heads(layer).reshape(heads, -1)
            mix = a.unsqueeze(0) + sign * (w[:, which].T @ d).reshape(int(which.sum()), *shape)
            change = self.layout.layers[layer].attn_post_norm.forward(mix) - normed.unsqueeze(0)
            out = out.index_put((which.nonzero()[:, 0],), change, accumulate=True) if not self.grad else out + change
        return out


def patched_forward(model, layout: Layout, graph: Graph, clean_ids: torch.Tensor, corrupt: CorruptRun,
                    weights: torch.Tensor, positions: int, *, expanded_layers: int | None = None) -> torch.Tensor:
    """The logits ``[B, positions, V]`` of the clean prompts with the edges outside ``weights`` patched.
    ``expanded_layers``: see ``gim_fast.circuits.deltas`` (default: as many as the free memory holds)."""
    if expanded_layers is None:
        expanded_layers = delta_layers(model, graph, clean_ids.numel(), positions=positions)
    patch = _Patch(layout, graph, corrupt, weights, expanded_layers)
    with ModelState() as state:
        def hook(module, fn, pre=False):
            if pre:
                state.forward_pre_hook(module, fn)
            else:
                state.forward_hook(module, fn)

        hook(layout.embedding, lambda m, a, out: patch.deltas.set_embedding(out - corrupt["emb"]))
        for layer, parts in enumerate(layout.layers):
            _patch_layer(patch, state, hook, layer, parts)
        final = layout.final_norm
        final_forward = final.forward
        state.swap_forward(final, lambda x: _norm_of(final_forward, x, patch.inputs(x, graph.n_sources,
                                                                                   [graph.logits_input], "xf")))
        return model(input_ids=clean_ids, use_cache=False, logits_to_keep=positions).logits


def _norm_of(forward, x: torch.Tensor, inputs) -> torch.Tensor:
    """A single input's norm: of ``x``, of the corrupt read, or of its own read."""
    if inputs is None:
        return forward(x)
    return forward(inputs.value if isinstance(inputs, CorruptRead) else inputs[0])


def _patch_layer(patch: _Patch, state: ModelState, hook, layer: int, parts) -> None:
    layout, graph, corrupt = patch.layout, patch.graph, patch.corrupt
    norm_forward = parts.input_norm.forward
    columns = {"q": graph.query_inputs(layer), "k": graph.key_inputs(layer), "v": graph.value_inputs(layer)}

    def own_projection(kind, normed):
        """The kind's part of the layer's own projection of ``normed`` (every head reading the same input)."""
        module, kinds = layout._projection_of(layer, kind)
        offset = sum(layout.width(k) for k in kinds[:kinds.index(kind)])
        return originals[module](normed)[..., offset:offset + layout.width(kind)]

    # the layer's attention inputs in graph order: (kind, head) for each query, key and value input
    inputs_of_layer = [(kind, h) for kind, cols in columns.items() for h in range(len(cols))]
    first_col = columns["q"].start

    def input_norm(x):
        """Build every query/key/value input's read, a few at a time (bounded transient memory), and stash each
        kind's projection: per head where the heads read their own residual, else the layer's own projection of
        the shared read (this run's or the corrupt run's residual), bit for bit; None for a kind none of whose
        heads has a patched edge."""
        pieces = {kind: [] for kind in columns}
        patched = dict.fromkeys(columns, False)
        shared = {}
        for start in range(0, len(inputs_of_layer), INPUT_CHUNK):
            chunk = inputs_of_layer[start:start + INPUT_CHUNK]
            reads = patch.inputs(x, graph.upstream(layer), range(first_col + start, first_col + start + len(chunk)),
                                 ("x", layer))
            normed = norm_forward(reads) if isinstance(reads, torch.Tensor) else None
            for kind in columns:                  # the chunk's heads of each kind are contiguous
                where = [i for i, (k, _) in enumerate(chunk) if k == kind]
                if not where:
                    continue
                heads = slice(chunk[where[0]][1], chunk[where[-1]][1] + 1)
                patched[kind] = patched[kind] or reads is not None
                if normed is not None:
                    pieces[kind].append(layout.project(layer, kind, normed[where[0]:where[-1] + 1], heads=heads))
                    continue
                key = (kind, "x" if reads is None else "corrupt")
                if key not in shared:
                    shared[key] = own_projection(kind, norm_forward(x if reads is None else reads.value))
                pieces[kind].append(shared[key][..., heads.start * layout.head_dim:heads.stop * layout.head_dim])
        for kind in columns:
            patch.stash[kind] = torch.cat(pieces[kind], dim=-1) if patched[kind] else None
        return norm_forward(x)

    state.swap_forward(parts.input_norm, input_norm)
    originals = {module: module.forward for module, _ in parts.projections}
    for module, kinds in parts.projections:
        forward = module.forward

        def projection(x, _forward=forward, _kinds=kinds):
            own = [patch.stash.get(k) for k in _kinds]
            if all(o is None for o in own):
                return _forward(x)
            if len(_kinds) == 1:
                return own[0]
            out = _forward(x)     # fused q/k/v (GPT-2): replace the patched parts
            pieces = out.split([layout.width(k) for k in _kinds], dim=-1)
            return torch.cat([p if o is None else o for p, o in zip(pieces, own)], dim=-1)

        state.swap_forward(module, projection)

    z_corrupt = corrupt[("z", layer)]
    hook(parts.o_proj, lambda m, args: patch.deltas.set_heads(layer, args[0] - z_corrupt), pre=True)
    if parts.attn_post_norm is not None:
        hook(parts.attn_post_norm, lambda m, args, out: patch.attn.__setitem__(layer, (args[0], out)))
    mlp_norm_forward = parts.mlp_norm.forward
    upstream = graph.upstream(layer) + graph.heads
    state.swap_forward(parts.mlp_norm, lambda x: _norm_of(mlp_norm_forward, x, patch.inputs(
        x, upstream, [graph.mlp_input(layer)], ("xm", layer))))
    mlp_corrupt = corrupt[("mlp", layer)]
    hook(parts.mlp_out, lambda m, args, out: patch.deltas.set_mlp(layer, out - mlp_corrupt))


def circuit_metric(model, task: Task, circuits, *, batch_size: int = 32,
                   graph: Graph | None = None, progress=None) -> torch.Tensor:
    """The task's metric per example ``[len(circuits), N]`` with each circuit (a ``[sources, inputs]`` bool matrix;
    ``circuits`` a sequence) run on every example; the corrupt run of a batch is recorded once for all circuits."""
    layout = layout_of(model)
    graph = graph or Graph.from_model(model)
    device = layout.embedding.weight.device
    out = torch.zeros(len(circuits), len(task))
    with torch.no_grad(), frozen_parameters(model), eval_mode(model):
        for idx in task.batches(batch_size):
            clean_ids, corrupt_ids, targets = task.batch(idx, device)
            corrupt = CorruptRun.of(model, layout, corrupt_ids)
            for c, circuit in enumerate(circuits):
                logits = patched_forward(model, layout, graph, clean_ids, corrupt, circuit.to(device),
                                         task.metric.positions)
                out[c, idx] = task.metric(logits, targets).float().cpu()
                if progress is not None:
                    progress(1)
    return out


def run_circuit(model, task: Task, circuit: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """The metric per example ``[N]`` with ``circuit`` (every other edge patched)."""
    return circuit_metric(model, task, [circuit], batch_size=batch_size)[0]


def edge_effects(model, task: Task, edges: torch.Tensor | None = None, *, batch_size: int = 32,
                 graph: Graph | None = None, progress=None) -> torch.Tensor:
    """The exact effect of patching each edge alone, ``m(full) − m(every edge but this one)``, mean over the
    examples: one forward pass per edge and batch. ``edges``: ``[K, 2]`` (source, input) rows of
    ``graph.edge_index()`` (default: every edge)."""
    graph = graph or Graph.from_model(model)
    edges = graph.edge_index() if edges is None else edges
    if len(edges) and not bool(graph.real[edges[:, 0], edges[:, 1]].all()):
        raise ValueError("edges must be (source, input) pairs of the graph's edges")
    patched = circuit_metric(model, task, _AllButOne(graph, edges), batch_size=batch_size, graph=graph,
                             progress=progress)
    full = task_metric(model, task, "clean", batch_size=batch_size)
    return full.mean() - patched.mean(1)


class _AllButOne:
    """The circuits "every edge but edges[k]", made when asked for (a list of them would hold K full matrices)."""

    def __init__(self, graph: Graph, edges: torch.Tensor):
        self.graph, self.edges = graph, edges.tolist()

    def __len__(self) -> int:
        return len(self.edges)

    def __getitem__(self, k: int) -> torch.Tensor:
        circuit = self.graph.full()
        circuit[self.edges[k][0], self.edges[k][1]] = False
        return circuit
