"""gim_fast.circuits on tiny random models of every family: the graph, circuit runs (patching), the scores of
GIM / EAP / EAP-IG against independent references, faithfulness and its areas, the memory estimate."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from gim_fast import GIM
from gim_fast.circuits import Graph, Task, attribute, circuit_metric, edge_effects, faithfulness, run_circuit
from gim_fast.circuits.faithfulness import area, spearman
from gim_fast.circuits.layout import layout_of
from gim_fast.circuits.memory import check_circuit_memory, estimate_circuit_memory
from gim_fast.circuits.patching import CorruptRun, patched_forward
from gim_fast.circuits.tasks import LogitDifference, task_metric
from gim_fast.memory import InsufficientMemoryError
from model_state import assert_same_state, snapshot
from tiny_models import FAMILIES, VOCAB, config_of, tiny_model


def toy_task(n: int = 3, length: int = 7, seed: int = 0) -> Task:
    """Random clean prompts; the corrupt ones differ at two positions; random answer/corrupt-answer pairs."""
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randint(1, VOCAB, (length,), generator=g) for _ in range(n)]
    corrupt = [c.clone() for c in clean]
    for c in corrupt:
        c[1] = c[1] % (VOCAB - 1) + 1
        c[length - 3] = (c[length - 3] + 7) % (VOCAB - 1) + 1
    return Task("toy", clean, corrupt, torch.randint(1, VOCAB, (n, 2), generator=g), LogitDifference())


@pytest.fixture(scope="module")
def models():
    """One float64 tiny model per family, in eval mode (dropout off, as the circuit code runs them)."""
    return {family: tiny_model(family, dtype=torch.float64).eval() for family in FAMILIES}


# ---------------------------------------------------------------------------------------------------------- graph


def test_graph_of_llama_3_8b_config():
    from transformers import LlamaConfig

    graph = Graph.from_config(LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          hidden_size=4096))
    layers, heads, kv = 32, 32, 8
    nodes = 1 + layers * (heads + 1)
    edges = sum((1 + layer * (heads + 1)) * (heads + 2 * kv) + (1 + layer * (heads + 1) + heads)
                for layer in range(layers)) + nodes
    assert (graph.n_sources, graph.n_inputs, graph.n_edges) == (1057, 32 * 49 + 1, edges) == (nodes, 1569, 805_681)
    assert graph.inputs[graph.key_inputs(3)[1]] == "a3.kv1<k>" and graph.inputs[graph.query_inputs(3)[5]] == "a3.h5<q>"
    assert graph.sources[graph.head_node(3, 5)] == "a3.h5" and graph.sources[graph.mlp_node(3)] == "m3"
    # GQA: the key input of kv head 1 is read by query heads 4..7 of its layer
    assert graph.owner[:, graph.key_inputs(3)[1]].nonzero()[:, 0].tolist() == [graph.head_node(3, h) for h in range(4, 8)]


@pytest.mark.parametrize("layers,heads,kv", [(2, 6, 2), (3, 3, 3)])
def test_graph_edges_follow_the_layer_order(layers, heads, kv):
    graph = Graph(layers, heads, kv)
    names = graph.sources

    def layer_of(name):
        return -1 if name == "input" else int(name[1:].split(".")[0])

    for s, name in enumerate(names):
        for i, dst in enumerate(graph.inputs):
            if dst == "logits":
                expected = True
            elif dst.startswith("m"):
                expected = layer_of(name) < layer_of(dst) or (layer_of(name) == layer_of(dst) and name.startswith("a"))
            else:
                expected = layer_of(name) < layer_of(dst)
            assert bool(graph.real[s, i]) == expected, (name, dst)
    assert ("a0.h1<k>" in graph.inputs) == (kv == heads)
    assert len(graph.edge_names()) == graph.n_edges and graph.edge_names()[0] == "input->a0.h0<q>"


def _reference_prune(graph: Graph, circuit: torch.Tensor) -> torch.Tensor:
    """Keep the edges on a path from the embedding to the logits (written as plain graph search)."""
    edges = [(s, i) for s, i in circuit.nonzero().tolist()]
    owners = {i: set(graph.owner[:, i].nonzero()[:, 0].tolist()) for i in range(graph.n_inputs)}
    forward = {0}
    for _ in range(graph.n_sources):
        forward |= {o for s, i in edges if s in forward for o in owners[i]}
    backward = set()
    for _ in range(graph.n_sources):
        backward |= {s for s, i in edges if i == graph.logits_input or owners[i] & backward}
    keep = forward & backward
    out = torch.zeros_like(circuit)
    for s, i in edges:
        if s in keep and (i == graph.logits_input or owners[i] & keep):
            out[s, i] = True
    return out


def test_top_edges_top_nodes_and_prune():
    graph = Graph(3, 4, 2)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.real.shape, generator=g) * graph.real
    for count in (0, 1, 5, 40, graph.n_edges):
        raw = graph.top_edges(scores, count, prune=False)
        assert int(raw.sum()) == count
        kept = scores[raw]
        dropped = scores[graph.real & ~raw]
        if count and len(dropped):
            assert kept.min() >= dropped.max()
        assert torch.equal(graph.top_edges(scores, count), _reference_prune(graph, raw))
    absolute = graph.top_edges(scores, 10, absolute=True, prune=False)
    assert scores[absolute].abs().min() >= scores[graph.real & ~absolute].abs().max()
    assert torch.equal(graph.top_edges(scores, graph.n_edges), graph.full())
    # nodes: every edge between kept nodes (a key input kept with any head of its group), then pruned
    node_scores = torch.randn(graph.n_sources, generator=g)
    top = torch.argsort(-node_scores)[:6]
    raw = graph.top_nodes(node_scores, 6, prune=False)
    for s, i in graph.edge_index().tolist():
        readers = graph.owner[:, i].nonzero()[:, 0]
        expected = s in top and (i == graph.logits_input or bool(torch.isin(readers, top).any()))
        assert bool(raw[s, i]) == expected
    assert torch.equal(graph.top_nodes(node_scores, 6), _reference_prune(graph, raw))
    with pytest.raises(ValueError, match="asked for 9999 edges"):
        graph.top_edges(scores, 9999)


# ---------------------------------------------------------------------------------------------------------- patching


@pytest.mark.parametrize("family", FAMILIES)
def test_full_circuit_is_the_clean_run_and_empty_the_corrupt_one(models, family):
    model = models[family]
    task = toy_task()
    layout, graph = layout_of(model), Graph.from_model(model)
    clean, corrupt, _ = task.batch([0, 1, 2], "cpu")
    with torch.no_grad():
        plain_clean = model(input_ids=clean, logits_to_keep=1).logits
        plain_corrupt = model(input_ids=corrupt, logits_to_keep=1).logits
        run = CorruptRun.of(model, layout, corrupt)
        full = patched_forward(model, layout, graph, clean, run, graph.full(), 1)
        empty = patched_forward(model, layout, graph, clean, run, graph.empty(), 1)
    assert torch.equal(full, plain_clean)
    assert torch.equal(empty, plain_corrupt)     # every input reads the corrupt residual: the corrupt run itself


@pytest.mark.parametrize("family", FAMILIES)
def test_head_outputs_sum_to_the_output_projection(models, family):
    model = models[family]
    layout = layout_of(model)
    z = torch.randn(2, 5, layout.heads * layout.head_dim, dtype=torch.float64)
    o_proj = layout.layers[1].o_proj
    bias = 0 if getattr(o_proj, "bias", None) is None else o_proj.bias
    heads = layout.head_outputs(1, z)
    torch.testing.assert_close(heads.sum(0), o_proj(z) - bias)
    alone = torch.zeros_like(z)
    alone[..., 2 * layout.head_dim:3 * layout.head_dim] = z[..., 2 * layout.head_dim:3 * layout.head_dim]
    torch.testing.assert_close(heads[2], o_proj(alone) - bias)          # head 2 is its own slice of z


@pytest.mark.parametrize("family", FAMILIES)
def test_circuit_runs_read_from_either_side_alike(models, family):
    """A small circuit's inputs are built from the corrupt residual plus the kept edges, a large one's from this
    run's residual minus the patched edges, with shortcuts for inputs that read one residual; a run with float
    edge weights that require grad always takes the second way with no shortcut. Both give the same metric."""
    model = models[family]
    task = toy_task()
    layout, graph = layout_of(model), Graph.from_model(model)
    clean, corrupt, targets = task.batch([0, 1, 2], "cpu")
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(graph.real.shape, generator=g) * graph.real
    for share in (0.03, 0.6):
        circuit = graph.top_edges(scores, int(share * graph.n_edges), prune=False)
        with torch.no_grad():
            run = CorruptRun.of(model, layout, corrupt)
            fast = patched_forward(model, layout, graph, clean, run, circuit, 1)
        slow = patched_forward(model, layout, graph, clean, run, circuit.double().requires_grad_(True), 1)
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-9, atol=1e-9)


def _projection(layout, layer, kind, normed):
    """The ``kind`` part of the layer's own q/k/v projection module's output."""
    module, kinds = layout._projection_of(layer, kind)
    offset = sum(layout.width(k) for k in kinds[:kinds.index(kind)])
    return module(normed)[..., offset:offset + layout.width(kind)]


def _slice_hook(layout, layer, kind, head, value):
    """A forward hook on the layer's projection that replaces head ``head``'s ``kind`` slice by ``value``."""
    module, kinds = layout._projection_of(layer, kind)
    offset = sum(layout.width(k) for k in kinds[:kinds.index(kind)]) + head * layout.head_dim

    def hook(m, args, out):
        out = out.clone()
        out[..., offset:offset + layout.head_dim] = value
        return out
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_patched_edge_by_hand(models, family):
    """Single patched edges recomputed here with plain hooks on the model: input -> the layer-1 key of kv head 1
    (every query head of its group reads it), a0.h2 -> the layer-1 query of head 1 (head 2's difference from
    the output projection of its z slice alone), m0 -> logits (the final residual minus the MLP's difference)."""
    model = models[family]
    task = toy_task(n=2)
    layout, graph = layout_of(model), Graph.from_model(model)
    clean, corrupt, targets = task.batch([0, 1], "cpu")
    D = layout.head_dim
    store = {}

    def keep(name):
        return lambda m, args, out: store.__setitem__(name, out)

    def keep_in(name):
        return lambda m, args: store.__setitem__(name, args[0])

    def metric_with(layer, kind, head, x):
        value = _projection(layout, layer, kind, layout.layers[layer].input_norm(x))[..., head * D:(head + 1) * D]
        handle = _slice_hook(layout, layer, kind, head, value)
        try:
            return task.metric(model(input_ids=clean, logits_to_keep=1).logits, targets).float()
        finally:
            handle.remove()

    def patched(src, dst):
        circuit = graph.full()
        circuit[src, dst] = False
        return run_circuit(model, task, circuit)

    with torch.no_grad():
        for ids, tag in ((corrupt, "corrupt"), (clean, "clean")):
            handles = [layout.embedding.register_forward_hook(keep(f"emb_{tag}")),
                       layout.layers[0].o_proj.register_forward_pre_hook(keep_in(f"z0_{tag}")),
                       layout.layers[1].input_norm.register_forward_pre_hook(keep_in(f"x1_{tag}")),
                       layout.layers[0].mlp_out.register_forward_hook(keep(f"mlp0_{tag}")),
                       layout.final_norm.register_forward_pre_hook(keep_in(f"xf_{tag}"))]
            model(input_ids=ids)
            for h in handles:
                h.remove()
        x = store["x1_clean"] - (store["emb_clean"] - store["emb_corrupt"])
        torch.testing.assert_close(patched(0, graph.key_inputs(1)[1]), metric_with(1, "k", 1, x))

        only2 = torch.zeros_like(store["z0_clean"])
        only2[..., 2 * D:3 * D] = (store["z0_clean"] - store["z0_corrupt"])[..., 2 * D:3 * D]
        o_proj = layout.layers[0].o_proj
        delta2 = o_proj(only2) - (0 if getattr(o_proj, "bias", None) is None else o_proj.bias)
        torch.testing.assert_close(patched(graph.head_node(0, 2), graph.query_inputs(1)[1]),
                                   metric_with(1, "q", 1, store["x1_clean"] - delta2))

        xf = store["xf_clean"] - (store["mlp0_clean"] - store["mlp0_corrupt"])
        logits = model.get_output_embeddings()(layout.final_norm(xf))[:, -1:]
        torch.testing.assert_close(patched(graph.mlp_node(0), graph.logits_input), task.metric(logits, targets).float())


# ---------------------------------------------------------------------------------------------------------- scores


def _reference_scores(model, task: Task, gim: bool) -> torch.Tensor:
    """∂m/∂w at w = 1 for a circuit run with float edge weights w: exactly the attribution-patching score of each
    edge, by autograd through the patching code (a path independent of the scoring hooks)."""
    layout, graph = layout_of(model), Graph.from_model(model)
    clean, corrupt, targets = task.batch(list(range(len(task))), "cpu")
    weights = graph.real.to(torch.float64).requires_grad_(True)
    with contextlib.ExitStack() as stack:
        if gim:
            stack.enter_context(GIM(model))
        run = CorruptRun.of(model, layout, corrupt)
        logits = patched_forward(model, layout, graph, clean, run, weights, task.metric.positions)
        (grad,) = torch.autograd.grad(task.metric(logits, targets).sum(), weights)
    return grad / len(task) * graph.real


@pytest.mark.parametrize("family", FAMILIES)
def test_gim_and_eap_scores_match_autograd_through_the_circuit_run(models, family):
    model = models[family]
    task = toy_task()
    before = snapshot(model)
    for method in ("eap", "gim"):
        scores = attribute(model, task, method, batch_size=2)   # two batches
        reference = _reference_scores(model, task, gim=method == "gim")
        # float64 models; the Hugging Face norms compute in float32 inside
        torch.testing.assert_close(scores.edges, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
        torch.testing.assert_close(scores.nodes, scores.edges.sum(1))
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_eap_ig_input_node_is_integrated_gradients_of_the_embedding(models, family):
    """The embedding's node score under EAP-IG is the Riemann sum of Δe · ∂m/∂e between the corrupt and clean
    embeddings, computed here with the model's own forward from ``inputs_embeds``."""
    model = models[family]
    task = toy_task(n=2)
    steps = 3
    scores = attribute(model, task, "eap-ig", ig_steps=steps)
    clean, corrupt, targets = task.batch([0, 1], "cpu")
    embed = model.get_input_embeddings()
    with torch.no_grad():
        e_clean, e_corrupt = embed(clean), embed(corrupt)
    total = 0.0
    for k in range(steps):
        e = (e_corrupt + k / steps * (e_clean - e_corrupt)).requires_grad_(True)
        m = task.metric(model(inputs_embeds=e, logits_to_keep=1).logits, targets).sum()
        (g,) = torch.autograd.grad(m, e)
        total += float(((e_clean - e_corrupt) * g).sum())
    assert scores.nodes[0].item() == pytest.approx(total / steps / len(task), rel=1e-6)
    # and with one step, EAP-IG is EAP at the corrupt embeddings: not the same as EAP
    assert not torch.allclose(attribute(model, task, "eap-ig", ig_steps=1).edges, attribute(model, task, "eap").edges)


def test_per_position_scores_sum_to_the_scores(models):
    model = models["qwen2"]
    task = toy_task()
    scores = attribute(model, task, "gim", per_position=True)
    assert scores.per_position.shape == (*scores.edges.shape, 7)
    torch.testing.assert_close(scores.per_position.sum(-1), scores.edges)
    assert bool((scores.per_position[:, :, :1] == 0).all())       # position 0 cannot change (its token is clean)
    with pytest.raises(ValueError, match="one length"):
        attribute(model, Task("mixed", [torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long)],
                              [torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long)],
                              torch.ones(2, 2, dtype=torch.long), LogitDifference()), "gim", per_position=True)


def test_bfloat16_model_scores_follow_float32():
    model = tiny_model("llama", dtype=torch.float32).eval()
    task = toy_task()
    reference = attribute(model, task, "gim").edge_values()
    low = attribute(model.to(torch.bfloat16), task, "gim").edge_values()
    assert spearman(low, reference) > 0.95


# ---------------------------------------------------------------------------------------------------------- faithfulness


def test_area_and_spearman_by_hand():
    pct = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
    assert area(pct, [1.0] * 10) == pytest.approx(0.999)
    assert area(pct, [1.0] * 10, distance_from_one=True) == 0
    assert area((10, 50, 100), [0.0, 1.0, 2.0]) == pytest.approx(0.4 * 0.5 + 0.5 * 1.5)
    assert area((10, 50, 100), [0.0, 1.0, 2.0], distance_from_one=True) == pytest.approx(0.4 * 0.5 + 0.5 * 0.5)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1)
    # ties take average ranks: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> Pearson of the ranks = sqrt(3)/2
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(3 ** 0.5 / 2)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_faithfulness_curves(models, family):
    model = models[family]
    task = toy_task(n=4)
    graph = Graph.from_model(model)
    scores = [attribute(model, task, m) for m in ("gim", "random")]
    result = faithfulness(model, task, scores, levels=("edge", "node"), rankings=("signed", "absolute"),
                          percentages=(5, 50, 100), batch_size=2)
    assert [(c.method, c.level, c.ranking) for c in result.curves] == [
        (m, lvl, r) for m in ("gim", "random") for lvl in ("edge", "node") for r in ("signed", "absolute")]
    clean = task_metric(model, task, "clean").mean().item()
    corrupt = task_metric(model, task, "corrupt").mean().item()
    assert result.full_metric == pytest.approx(clean, abs=1e-12)
    assert result.empty_metric == pytest.approx(corrupt, abs=1e-6)       # f(∅) = 0: the empty circuit is the corrupt run
    for curve in result.curves:
        assert curve.faithfulness[-1] == 1.0 and curve.edges[-1] == graph.n_edges    # f(100%) = 1 exactly
        assert curve.cpr == pytest.approx(area(curve.percentages, curve.faithfulness))
    # a point of a curve is the circuit's metric, normalised
    for curve, absolute in zip(result.curves[:2], (False, True)):
        circuit = graph.top_edges(scores[0].edges, int(0.05 * graph.n_edges), absolute=absolute)
        m = run_circuit(model, task, circuit, batch_size=3).mean().item()
        assert curve.faithfulness[0] == pytest.approx((m - corrupt) / (clean - corrupt), rel=1e-6, abs=1e-9)


def test_exact_edge_effects_and_their_correlation(models):
    """Exact patching of single edges; EAP's first-order scores track them on a tiny model."""
    model = models["llama"]
    task = toy_task(n=3)
    graph = Graph.from_model(model)
    edges = graph.edge_index()
    effects = edge_effects(model, task, edges, graph=graph)
    circuit = graph.full()
    s, i = edges[17].tolist()
    circuit[s, i] = False
    alone = task_metric(model, task).mean() - run_circuit(model, task, circuit).mean()
    assert effects[17].item() == pytest.approx(alone.item(), rel=1e-9, abs=1e-12)
    rho = {m: spearman(attribute(model, task, m).edges[edges[:, 0], edges[:, 1]], effects)
           for m in ("eap", "eap-ig", "gim")}
    assert rho["eap"] > 0.5 and rho["eap-ig"] > 0.5, rho


def test_state_is_restored_after_an_error(models):
    model = models["gemma3"]
    before = snapshot(model)

    class Broken(LogitDifference):
        def __call__(self, logits, targets):
            raise RuntimeError("metric failed")

    task = toy_task()
    task.metric = Broken()
    for method in ("gim", "eap", "eap-ig"):
        with pytest.raises(RuntimeError, match="metric failed"):
            attribute(model, task, method)
        assert_same_state(before, snapshot(model))
    with pytest.raises(RuntimeError, match="metric failed"):
        circuit_metric(model, task, [Graph.from_model(model).empty()])
    assert_same_state(before, snapshot(model))


# ---------------------------------------------------------------------------------------------------------- memory


def test_memory_estimate_for_llama_3_8b_fits_80_gb():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8)
    est = estimate_circuit_memory(cfg, 32, 64, dtype=torch.bfloat16)
    delta = 1057 * 64 * 32 * 4096 * 2          # every node's output difference, bf16
    key = "node differences Δ, 32 layers expanded"
    assert est.scoring[key] == delta == est.patching[key]
    weights = 8.03e9 * 2
    assert est.total + weights < 80e9 and est.total > delta
    assert "total (the larger phase)" in str(est)
    compact = estimate_circuit_memory(cfg, 32, 64, dtype=torch.bfloat16, expanded_layers=0)
    # compact: the embedding's row, then per layer one attention output (32 heads × 128) and one MLP output
    assert compact.scoring["node differences Δ, 32 layers compact"] == 32 * (4096 + 4096) * 64 * 32 * 2
    assert compact.total < est.total - delta / 2


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_compact_deltas_and_small_chunks_give_the_same_results(models, family, monkeypatch):
    """Every layer's Δ expanded or none (each use expands it again), and inputs built 4 at a time instead of 8."""
    import gim_fast.circuits.attribution as attribution_module
    import gim_fast.circuits.patching as patching_module

    model = models[family]
    task = toy_task()
    graph = Graph.from_model(model)
    expanded = attribute(model, task, "gim", expanded_layers=2)
    circuit = graph.top_edges(expanded.edges, 40)
    metric = circuit_metric(model, task, [circuit], graph=graph)
    monkeypatch.setattr(attribution_module, "INPUT_CHUNK", 4)
    monkeypatch.setattr(patching_module, "INPUT_CHUNK", 4)
    for layers in (0, 1):
        compact = attribute(model, task, "gim", expanded_layers=layers)
        torch.testing.assert_close(compact.edges, expanded.edges, rtol=1e-12, atol=1e-14)
        layout = layout_of(model)
        clean, corrupt, targets = task.batch([0, 1, 2], "cpu")
        with torch.no_grad():
            logits = patched_forward(model, layout, graph, clean, CorruptRun.of(model, layout, corrupt), circuit, 1,
                                     expanded_layers=layers)
        torch.testing.assert_close(task.metric(logits, targets).float(), metric[0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident-set peak is read on Linux")
def test_peak_memory_of_a_block_on_the_cpu():
    """A block that holds 256 MiB at once peaks at about that above its start, even after an earlier, larger peak."""
    from gim_fast.circuits.run import peak_memory

    big = torch.ones(96 * 2**20)        # 384 MiB, freed before the measured block
    del big
    with peak_memory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2**20)       # 256 MiB, touched
        del x
    assert 200 * 2**20 < peak["bytes"] < 330 * 2**20


def test_memory_check_refuses_before_running(models, monkeypatch):
    import gim_fast.circuits.memory as memory

    model = models["llama"]
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match="smaller batch size"):
        check_circuit_memory(model, 37, 8)


def test_unsupported_models_are_refused():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ValueError, match="supported model types"):
        Graph.from_model(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=37, vocab_size=50)))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        attribute(torch.nn.Linear(2, 2), toy_task(), "gim")
    with pytest.raises(ValueError, match="unknown method"):
        attribute(tiny_model("llama"), toy_task(), "exact")
    with pytest.raises(ValueError, match="not this model's"):
        attribute(tiny_model("llama"), toy_task(), "gim", graph=Graph.from_config(config_of("gpt2")))
