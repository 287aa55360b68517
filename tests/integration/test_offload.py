"""GIM on models dispatched by accelerate: layers offloaded to disk (``from_pretrained(device_map=...,
offload_folder=...)`` through ``gim_fast.models.load_pretrained``) or to CPU memory (``accelerate.cpu_offload``
with ``offload_buffers``), on the CPU.

accelerate replaces an offloaded module's weights by ``meta`` placeholders and loads them in a hook around the
module's forward; GIM's swapped forwards, checkpointing and the circuits' weight reads must keep that loading. The
reference is the same weights undispatched: ``explain``, ``explain_answer``, ``attribute_context`` and circuit
scores and circuit runs must equal it within 1e-5 (float32), for Llama, Gemma 3 and Qwen 3 (Qwen 2 for
``explain``). And everything the user passed in is as it was afterwards, also after an exception: each module's
``forward``, ``_old_forward`` and ``_hf_hook`` (the same objects), which weights are placeholders, every
``requires_grad`` and training flag.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.circuits import Graph, attribute, run_circuit
from gim_fast.models import load_pretrained
from jobs_support import char_tokenizer, save_tiny
from tiny_models import random_ids

FAMILIES = ("llama", "gemma3", "qwen3")
LAYOUTS = ("disk", "cpu")
TOLERANCE = 1e-5

# every module of the first decoder layer stays in memory, the rest of the model is read from disk when it runs
DISK_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: a tiny model saved with the char tokenizer, and that model loaded undispatched (the reference)."""
    root = tmp_path_factory.mktemp("offload")
    out = {}
    for family in (*FAMILIES, "qwen2"):
        folder = save_tiny(root / family, family, seed=3)
        model, tokenizer = load_pretrained(folder)
        out[family] = (folder, model, tokenizer)
    return out


def dispatched(saved, family: str, layout: str, tmp_path):
    """The family's saved model, dispatched by accelerate in ``layout``."""
    folder, reference, _ = saved[family]
    if layout == "disk":
        model, _ = load_pretrained(folder, device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    else:
        from accelerate import cpu_offload

        model = cpu_offload(copy.deepcopy(reference), execution_device="cpu", offload_buffers=True)
    placeholders = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert placeholders, "nothing was offloaded: the test would not test offloading"
    if layout == "disk":
        assert not any(n.startswith("model.layers.0.") for n in placeholders)
    return model


def close(a, b) -> None:
    a, b = (x.detach().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))
            for x in (a, b))                             # NumPy values copied: read-only arrays too
    assert a.shape == b.shape
    difference = float((a - b).abs().max())
    assert difference <= TOLERANCE * max(1.0, float(b.abs().max())), difference


def state(model) -> dict:
    """What GIM must leave as it found it on a dispatched model, object identities included."""
    return {name: (m.__dict__.get("forward"), m.__dict__.get("_old_forward"), getattr(m, "_hf_hook", None), m.training,
                   {n: (p.device.type, p.requires_grad) for n, p in m._parameters.items() if p is not None},
                   {n: b.device.type for n, b in m._buffers.items() if b is not None},
                   len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()}


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        for i, what in enumerate(("forward", "_old_forward", "_hf_hook")):
            assert before[name][i] is after[name][i], f"{name}.{what} is not the object it was"
        assert before[name][3:] == after[name][3:], f"{name} changed: {before[name][3:]} → {after[name][3:]}"


# -------------------------------------------------------------------------------------------------- the APIs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", (*FAMILIES, "qwen2"))
def test_explain(saved, family, layout, tmp_path):
    _, reference, _ = saved[family]
    model = dispatched(saved, family, layout, tmp_path)
    before = state(model)
    ids = torch.stack([random_ids(11, seed=1), random_ids(11, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                      # a left-padded row
    for checkpointing in (False, True):
        expected = gim_fast.explain(reference, ids, attention_mask=mask, baseline_token_id=0)
        got = gim_fast.explain(model, ids, attention_mask=mask, baseline_token_id=0, checkpointing=checkpointing)
        close(got, expected)
        assert_same(before, state(model))
    plain = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
                 gate_scale=None, up_scale=None)
    close(gim_fast.explain(model, ids[0], baseline_token_id=0, **plain),
          gim_fast.explain(reference, ids[0], baseline_token_id=0, **plain))
    assert not torch.allclose(gim_fast.explain(reference, ids[0], baseline_token_id=0, **plain),
                              gim_fast.explain(reference, ids[0], baseline_token_id=0), atol=1e-4)   # GIM differs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_explain_answer(saved, family, layout, tmp_path):
    _, reference, _ = saved[family]
    model = dispatched(saved, family, layout, tmp_path)
    before = state(model)
    prompt, answer = random_ids(9, seed=4), random_ids(4, seed=5)
    for kwargs in ({}, {"target": "logprob", "total": True}, {"checkpointing": True}):
        got = gim_fast.explain_answer(model, prompt, answer, baseline_token_id=0, **kwargs)
        expected = gim_fast.explain_answer(reference, prompt, answer, baseline_token_id=0,
                                           **{k: v for k, v in kwargs.items() if k != "checkpointing"})
        close(got.scores, expected.scores)
        close(got.target_logits, expected.target_logits)
    assert_same(before, state(model))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attribute_context(saved, family, layout, tmp_path):
    _, reference, _ = saved[family]
    tok = char_tokenizer()
    model = dispatched(saved, family, layout, tmp_path)
    before = state(model)
    sources = ["Lima is in Peru.", "Oslo is cold.", "Rome is old."]
    args = (tok, sources, "Where is Lima?", " Peru")
    got = gim_fast.attribute_context(model, *args, baseline_token_id=0)
    expected = gim_fast.attribute_context(reference, *args, baseline_token_id=0)
    close(got["score"].to_numpy(), expected["score"].to_numpy())
    close(got.token_scores.to_numpy(), expected.token_scores.to_numpy())
    assert_same(before, state(model))


def _circuit_task():
    from gim_fast.circuits import Task
    from gim_fast.circuits.tasks import LogitDifference

    g = torch.Generator().manual_seed(0)
    clean = [torch.randint(1, 101, (7,), generator=g) for _ in range(3)]
    corrupt = [c.clone() for c in clean]
    for c in corrupt:
        c[1], c[4] = c[1] % 100 + 1, (c[4] + 7) % 100 + 1
    return Task("toy", clean, corrupt, torch.randint(1, 101, (3, 2), generator=g), LogitDifference())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_circuits(saved, family, layout, tmp_path):
    """Edge scores (GIM, and EAP's plain gradient) and circuit runs, among them one whose last layer's query, key
    and value inputs all read the corrupt run: that layer's projections then run from the input norm's forward,
    outside their own module's call (where accelerate has not loaded their weights)."""
    _, reference, _ = saved[family]
    model = dispatched(saved, family, layout, tmp_path)
    before = state(model)
    task = _circuit_task()
    for method in ("gim", "eap"):
        close(attribute(model, task, method).edges, attribute(reference, task, method).edges)
    graph = Graph.from_model(reference)
    corrupt_inputs = graph.real.bool().clone()
    last = graph.layers - 1
    for cols in (graph.query_inputs(last), graph.key_inputs(last), graph.value_inputs(last)):
        corrupt_inputs[:, cols] = False
    half = graph.real.bool() & (torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    for circuit in (corrupt_inputs, half):
        close(run_circuit(model, task, circuit), run_circuit(reference, task, circuit))
    assert_same(before, state(model))


# ---------------------------------------------------------------------------------------------- restoration


class Boom(Exception):
    pass


@pytest.mark.parametrize("layout", LAYOUTS)
def test_everything_is_restored_after_an_exception(saved, layout, tmp_path, monkeypatch):
    """An exception inside a norm's forward (after accelerate loaded its weight, before it put the placeholder
    back) and one in the user's code inside ``GIM``: hooks, forwards, placeholders and flags are as before."""
    model = dispatched(saved, "llama", layout, tmp_path)
    first = next(p for p in model.parameters() if p.device.type == "meta")
    first.requires_grad_(False)                         # a flag of the user's own, restored as it was
    before = state(model)
    offloaded_norm = model.model.norm if layout == "disk" else model.model.layers[0].input_layernorm
    assert offloaded_norm.weight.device.type == "meta"

    def broken(*args, **kwargs):
        raise Boom

    with monkeypatch.context() as m:
        m.setattr(gim_fast.ops, "frozen_rms_norm", broken)
        with pytest.raises(Boom):
            gim_fast.explain(model, random_ids(8), baseline_token_id=0)
    assert_same(before, state(model))
    with pytest.raises(Boom), gim_fast.GIM(model):
        model(random_ids(7, batch=1)).logits.sum().backward()
        raise Boom
    assert_same(before, state(model))
    assert not model.training or all(m.training for m in model.modules())


def test_checkpointed_recomputation_leaves_no_weight_loaded(saved, tmp_path):
    """The checkpointed backward recomputes each offloaded layer to its end, so that the hook of its last module
    puts that module's placeholders back right away (stopped early, as torch's checkpoint does by default, the down
    projection's weight stayed loaded until the end of the call). Checked inside the checkpointing context, before
    anything else could put the placeholders back."""
    from gim_fast.integration import checkpointed_layers, frozen_parameters

    model = dispatched(saved, "llama", "disk", tmp_path)
    layer = model.model.layers[1]
    with frozen_parameters(model), checkpointed_layers(model):
        inputs = model.get_input_embeddings()(random_ids(8, batch=1)).detach().requires_grad_(True)
        model(inputs_embeds=inputs, use_cache=False).logits[0, -1].sum().backward()
        assert inputs.grad is not None
        assert all(p.device.type == "meta" for p in layer.parameters())


# ------------------------------------------------------------------------------------------- the command line


def test_command_line_with_a_device_map(saved, tmp_path, capsys):
    """``gim-fast explain`` with a device map that puts layers on disk prints what it prints without one;
    ``gim-fast attribute --max-memory cpu=100KB`` (device map auto: what does not fit goes to disk) writes the
    scores of a run without one."""
    import json

    import numpy as np

    from gim_fast.cli import main
    from jobs_support import table_rows, write_jsonl

    folder = saved["llama"][0]
    base = ["explain", "hello there", "--model", str(folder), "--color", "never"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps(DISK_MAP))
    assert main([*base, "--device-map", str(device_map), "--offload-folder", str(tmp_path / "off")]) == 0
    assert capsys.readouterr().out == plain

    from gim_fast.integration import is_offloaded

    spread, _ = load_pretrained(folder, max_memory={"cpu": "100KB"}, offload_folder=tmp_path / "off1")
    assert is_offloaded(spread)                          # what the command below loads: most of it on disk
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ("hello there", "general kenobi", "abc")])
    args = ["attribute", "--data", str(data), "--model", str(folder), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "spread"), "--max-memory", "cpu=100KB", "--offload-folder",
                 str(tmp_path / "off2")]) == 0
    for a, b in zip(table_rows(tmp_path / "spread"), table_rows(tmp_path / "plain")):
        assert (a["line"], a["token_ids"], a["target_id"]) == (b["line"], b["token_ids"], b["target_id"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=TOLERANCE)
