"""Edge and node scores by attribution patching: GIM (default), plain EAP, and EAP-IG.

For an edge u → v (v an input of a downstream node) and examples b with positions s:

    score(u → v) = mean_b Σ_s (a_u(clean) − a_u(corrupt)) · ∂m/∂in_v          ≈ m(clean) − m(edge u → v patched)

a_u a node's output (its additive contribution to the residual stream), in_v the residual stream as input v reads
it, m the task's metric summed over the batch. Positive: the edge carries the clean behaviour. (This is the MIB
convention of attributing the loss −m; the plain formula with (corrupt − clean) is its negative.) The gradient is
taken on the clean run under GIM's backward (``gim``), under plain autograd (``eap``), or averaged over ``ig_steps``
runs whose input embeddings go from the corrupt to the clean ones, k/steps for k = 0 … steps−1 (``eap-ig``, the
EAP-IG "inputs" variant). A node's score is the same with ∂m/∂a_u; since a_u reaches m only through the inputs
it feeds, it equals the sum of its edges' scores.

How, per batch: one forward of the corrupt prompts (no gradient) and one of the clean prompts record every node's
output: the embedding, each layer's attention output ``z`` (before the output projection: ``head_dim`` values per
head instead of the hidden size) and each MLP's output. Their differences, expanded per head through the head's
slice of the output projection (and, for Gemma, through the attention's post-norm, linearised: frozen under GIM),
form ``Δ [nodes, B, S, H]``. Then one backward of m from the clean logits; the gradient of each input arrives in
a hook when the backward reaches its layer and is contracted with Δ of the upstream nodes at once: the query,
key and value inputs from the projection's output gradient (per head, ``dq_h @ W_q[h]``) pushed back through the
layer's input norm (its own forward, frozen under GIM: a per-position diagonal; the full Jacobian for EAP), the
MLP and the logits from the gradient at their norm's input along their own path. No per-head copy of the residual
stream is made in the forward, and the per-input gradients of one layer live only while that layer is contracted.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..integration import GIM, ModelState, eval_mode, family_of, frozen_parameters
from ..settings import GIMSettings
from .deltas import NodeDeltas
from .graph import Graph
from .layout import Layout, layout_of
from .memory import INPUT_CHUNK, delta_layers
from .tasks import Task

__all__ = ["Scores", "attribute", "METHODS", "DEFAULT_IG_STEPS"]

METHODS = ("gim", "eap", "eap-ig", "random")
DEFAULT_IG_STEPS = 5


@dataclass
class Scores:
    """Edge scores ``[sources, inputs]`` (0 where there is no edge), mean over the examples."""

    method: str
    graph: Graph
    edges: torch.Tensor
    seconds: float = 0.0
    examples: int = 0
    per_position: torch.Tensor | None = None   # [sources, inputs, S] when asked for (one prompt length only)

    @property
    def nodes(self) -> torch.Tensor:
        """``[sources]``: each node's score, the sum of its outgoing edges' scores."""
        return self.edges.sum(1)

    def edge_values(self) -> torch.Tensor:
        """The scores of the edges in ``graph.edge_index()`` order."""
        return self.edges[self.graph.real]


# ------------------------------------------------------------------------------------------------------ recording


def record_outputs(layout: Layout, store: dict, state: ModelState, *, reads: bool = False) -> None:
    """Hooks that put each node's output into ``store`` during a forward pass: ``"emb"``, ``("z", l)`` (the output
    projection's input), ``("mlp", l)``; with post-norms also ``("A", l)``/``("P", l)``, the attention norm's input
    and output. With ``reads``, also the residual stream where the inputs read it: ``("x", l)`` (the input norm's
    input), ``("xm", l)`` (the MLP norm's) and ``"xf"`` (the final norm's)."""
    def keep_output(key):
        return lambda module, args, out: store.__setitem__(key, out)

    def keep_input(key):
        return lambda module, args: store.__setitem__(key, args[0])

    state.forward_hook(layout.embedding, keep_output("emb"))
    for i, parts in enumerate(layout.layers):
        state.forward_pre_hook(parts.o_proj, keep_input(("z", i)))
        state.forward_hook(parts.mlp_out, keep_output(("mlp", i)))
        if parts.attn_post_norm is not None:
            state.forward_pre_hook(parts.attn_post_norm, keep_input(("A", i)))
            state.forward_hook(parts.attn_post_norm, keep_output(("P", i)))
        if reads:
            state.forward_pre_hook(parts.input_norm, keep_input(("x", i)))
            state.forward_pre_hook(parts.mlp_norm, keep_input(("xm", i)))
    if reads:
        state.forward_pre_hook(layout.final_norm, keep_input("xf"))


def norm_jvp(model, norm: torch.nn.Module, x: torch.Tensor, v: torch.Tensor, *, frozen: bool) -> torch.Tensor:
    """J·v for an RMSNorm at x, v ``[n, ...]`` a stack of tangents: the full Jacobian, or with the statistic
    frozen (GIM): ``v · w_eff / rms(x)``. Used for the attention post-norms of Gemma 2/3."""
    family = family_of(model)
    if family.norm_kind == "layer":
        raise NotImplementedError("post-norms are RMSNorms in every supported family")
    eps = getattr(norm, family.norm_eps_attr)
    offset = 1.0 if family.norm_kind == "rms_gemma" else 0.0
    ct = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(ct), v.to(ct)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    dy = v * rstd
    if not frozen:
        dy = dy - x * rstd.pow(3) * (x * v).mean(-1, keepdim=True)
    return dy * (offset + norm.weight.to(ct))


def node_deltas(model, layout: Layout, graph: Graph, clean: dict, corrupt: dict, *, frozen_post_norm: bool,
                expanded_layers: int) -> NodeDeltas:
    """Δ = clean − corrupt outputs; a head's row is its output-projection slice of its z difference, through the
    attention post-norm's linearisation for Gemma (frozen under GIM)."""
    post = {layer: clean[("A", layer)] for layer, parts in enumerate(layout.layers) if parts.attn_post_norm is not None}

    def expand(layer, z_delta):
        heads = layout.head_outputs(layer, z_delta)
        if layer in post:
            heads = norm_jvp(model, layout.layers[layer].attn_post_norm, post[layer], heads, frozen=frozen_post_norm)
        return heads.to(z_delta.dtype)

    deltas = NodeDeltas(graph, expand, expanded_layers)
    deltas.set_embedding(clean["emb"] - corrupt["emb"])
    for layer in range(len(layout.layers)):
        deltas.set_heads(layer, clean[("z", layer)] - corrupt[("z", layer)])
        deltas.set_mlp(layer, clean[("mlp", layer)] - corrupt[("mlp", layer)])
    return deltas


# ------------------------------------------------------------------------------------------------------ scoring


class _Scorer:
    """Hooks for one backward: contract each input's gradient with the upstream Δ into ``scores``."""

    def __init__(self, layout: Layout, graph: Graph, scores: torch.Tensor, per_position: torch.Tensor | None):
        self.layout, self.graph = layout, graph
        self.delta: NodeDeltas | None = None      # set before the backward
        self.scores, self.per_position = scores, per_position
        self.norm_inputs: dict[int, torch.Tensor] = {}

    def install(self, state: ModelState) -> None:
        """The scoring hooks, removed when ``state`` exits."""
        for layer, parts in enumerate(self.layout.layers):
            state.forward_pre_hook(parts.input_norm, self._keep_norm_input(layer))
            for module, kinds in parts.projections:
                state.forward_hook(module, self._on_projection(layer, kinds))
            rows = self.graph.upstream(layer) + self.graph.heads
            state.forward_pre_hook(parts.mlp_norm, self._on_residual_read(rows, [self.graph.mlp_input(layer)]))
        state.forward_pre_hook(self.layout.final_norm,
                               self._on_residual_read(self.graph.n_sources, [self.graph.logits_input]))

    def _keep_norm_input(self, layer):
        def hook(module, args):
            self.norm_inputs[layer] = args[0].detach()
        return hook

    def _on_residual_read(self, rows: int, cols: list[int]):
        """The MLP's (the logits') input: a view of the residual stream whose gradient is the one along this
        input's own path only."""
        def hook(module, args):
            x = args[0].view_as(args[0])
            if x.requires_grad:
                x.register_hook(lambda g: self._contract(rows, cols, g.unsqueeze(0)))
            return (x, *args[1:])
        return hook

    def _on_projection(self, layer: int, kinds: tuple[str, ...]):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: self._projection_grad(layer, kinds, g))
        return hook

    def _projection_grad(self, layer: int, kinds: tuple[str, ...], grad: torch.Tensor) -> None:
        layout, graph = self.layout, self.graph
        start = 0
        for kind in kinds:
            width = layout.width(kind)
            g = grad[..., start:start + width]
            start += width
            weight, _ = layout.projection_weight(layer, kind)
            g = g.reshape(*g.shape[:2], weight.shape[0], layout.head_dim)
            cols = {"q": graph.query_inputs, "k": graph.key_inputs, "v": graph.value_inputs}[kind](layer)
            for first in range(0, len(cols), INPUT_CHUNK):   # a few inputs at a time bounds the transient memory
                heads = slice(first, first + INPUT_CHUNK)
                u = torch.einsum("bsnd,ndh->nbsh", g[:, :, heads], weight[heads].to(g.dtype))  # after the norm
                self._contract(graph.upstream(layer), list(cols[heads]), self._through_norm(layer, u))

    def _through_norm(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        """Push the stacked cotangents ``u [n, B, S, H]`` back through the layer's input norm at its clean input:
        the norm's current forward (GIM's frozen one inside a GIM context) on n copies of the input."""
        norm = self.layout.layers[layer].input_norm
        x = self.norm_inputs[layer]
        with torch.enable_grad():
            xs = x.unsqueeze(0).expand(u.shape[0], *x.shape).clone().requires_grad_(True)
            y = norm.forward(xs)            # .forward: not the hooks of __call__
            (gx,) = torch.autograd.grad(y, xs, u.to(y.dtype))
        return gx

    def _contract(self, rows: int, cols: list[int], g: torch.Tensor) -> None:
        """scores[:rows, cols] += Σ_{b,s,h} Δ[:rows] · g  (g ``[len(cols), B, S, H]``), a block of Δ at a time."""
        acc = self.scores.dtype
        cols_t = torch.tensor(cols, device=self.scores.device)
        flat_g = g.reshape(len(cols), -1).to(acc)
        for first, delta in self.delta.pieces(rows):
            n = len(delta)
            if self.per_position is not None:
                pos = torch.einsum("rbsh,cbsh->rcs", delta.to(acc), g.to(acc))
                self.per_position[first:first + n, cols_t] += pos
                self.scores[first:first + n, cols_t] += pos.sum(-1)
                continue
            if delta.dtype == acc:
                block = delta.reshape(n, -1) @ flat_g.T
            else:   # low-precision Δ: upcast a few rows at a time
                block = torch.cat([d.reshape(len(d), -1).to(acc) @ flat_g.T for d in delta.split(16)])
            self.scores[first:first + n, cols_t] += block


@contextlib.contextmanager
def _embedding_override(layout: Layout, value_fn):
    """Replace the embedding's output by ``value_fn(output)`` (a leaf that requires grad) for the duration."""
    with ModelState() as state:
        state.forward_hook(layout.embedding, lambda module, args, out: value_fn(out))
        yield


def _forward(model, ids: torch.Tensor, positions: int) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, logits_to_keep=positions).logits


def _record(model, layout: Layout, ids: torch.Tensor, positions: int) -> dict:
    """Every node's output for ``ids`` (no gradient)."""
    store = {}
    with torch.no_grad(), ModelState() as state:
        record_outputs(layout, store, state)
        _forward(model, ids, positions)
    return store


def _score_batch(model, layout: Layout, graph: Graph, task: Task, idx: list[int], method: str,
                 settings: GIMSettings, ig_steps: int, scores: torch.Tensor, per_position: torch.Tensor | None,
                 expanded_layers: int | None) -> None:
    """Add the batch's scores, summed over its examples (and over the EAP-IG steps), into ``scores``."""
    clean_ids, corrupt_ids, targets = task.batch(idx, layout.embedding.weight.device)
    positions = task.metric.positions
    if expanded_layers is None:
        expanded_layers = delta_layers(model, graph, clean_ids.numel(), positions=positions)
    corrupt = _record(model, layout, corrupt_ids, positions)
    with ModelState() as state:
        if method == "gim":
            state.enter_context(GIM.from_settings(model, settings))
        scorer = _Scorer(layout, graph, scores, per_position)
        scorer.install(state)
        if method == "eap-ig":   # Δ from plain clean and corrupt runs; gradients at k/steps of the way
            clean = _record(model, layout, clean_ids, positions)
            scorer.delta = node_deltas(model, layout, graph, clean, corrupt, frozen_post_norm=False,
                                       expanded_layers=expanded_layers)
            e_clean, e_corrupt = clean["emb"], corrupt["emb"]
            del clean, corrupt
            for k in range(ig_steps):
                mix = (e_corrupt + (k / ig_steps) * (e_clean - e_corrupt)).requires_grad_(True)
                with _embedding_override(layout, lambda out, _mix=mix: _mix):
                    m = task.metric(_forward(model, clean_ids, positions), targets).sum()
                m.backward()
            return
        # gim / eap: one clean forward (recording, with gradient), Δ, one backward
        clean = {}
        with ModelState() as rec:
            record_outputs(layout, clean, rec)
            with _embedding_override(layout, lambda out: out.detach().requires_grad_(True)):
                m = task.metric(_forward(model, clean_ids, positions), targets).sum()
        clean = {k: v.detach() for k, v in clean.items()}
        scorer.delta = node_deltas(model, layout, graph, clean, corrupt,
                                   frozen_post_norm=method == "gim" and settings.freeze_norm,
                                   expanded_layers=expanded_layers)
        del clean, corrupt
        m.backward()


def attribute(model, task: Task, method: str = "gim", *, graph: Graph | None = None, batch_size: int = 32,
              ig_steps: int = DEFAULT_IG_STEPS, settings: GIMSettings | None = None, per_position: bool = False,
              seed: int = 0, expanded_layers: int | None = None, progress=None) -> Scores:
    """Score every edge of ``model``'s graph on ``task`` with ``method`` ∈ gim, eap, eap-ig, random.

    ``settings``: GIM's (default: the paper's); ``ig_steps``: EAP-IG's interpolation steps (5, as the MIB
    benchmark); ``per_position``: also keep the score of every position (all prompts must have one length);
    ``expanded_layers``: how many layers keep their heads' Δ expanded (default: as many as the free memory holds;
    see ``gim_fast.circuits.deltas``); ``progress``: a callable taking the number of examples just done. The
    model is left exactly as it was.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")
    layout = layout_of(model)
    graph = graph or Graph.from_model(model)
    if (graph.layers, graph.heads, graph.kv_heads) != (len(layout.layers), layout.heads, layout.kv_heads):
        raise ValueError(f"the graph ({graph.layers} layers × {graph.heads} heads) is not this model's")
    lengths = {ids.numel() for ids in task.clean}
    if per_position and len(lengths) != 1:
        raise ValueError(f"per-position scores need prompts of one length; this task has lengths {sorted(lengths)}")
    acc = torch.promote_types(layout.embedding.weight.dtype, torch.float32)
    scores = torch.zeros(graph.n_sources, graph.n_inputs, dtype=acc)
    pos = torch.zeros(graph.n_sources, graph.n_inputs, lengths.pop(), dtype=acc) if per_position else None
    started = time.perf_counter()
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(scores.shape, generator=g, dtype=acc) * graph.real
        return Scores(method, graph, scores, time.perf_counter() - started, len(task))
    settings = settings or GIMSettings()
    device = layout.embedding.weight.device
    scores, pos = scores.to(device), (None if pos is None else pos.to(device))
    with frozen_parameters(model), eval_mode(model):
        for idx in task.batches(batch_size):
            _score_batch(model, layout, graph, task, idx, method, settings, ig_steps, scores, pos, expanded_layers)
            if progress is not None:
                progress(len(idx))
    count = len(task) * (ig_steps if method == "eap-ig" else 1)
    scores = (scores / count).cpu() * graph.real
    if pos is not None:
        pos = (pos / count).cpu() * graph.real[..., None]
    return Scores(method, graph, scores, time.perf_counter() - started, len(task), pos)
