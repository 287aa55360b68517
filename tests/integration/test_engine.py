"""The long-context engine: checkpointing changes nothing but memory; the memory estimate refuses, quickly and
without touching the model, what cannot fit; every op runs on its own tensors' device."""
from __future__ import annotations

import time

import pytest
import torch

import gim_fast
from gim_fast import memory
from model_state import assert_same_state, snapshot
from tiny_models import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_same_scores(family):
    model = tiny_model(family, torch.float64)
    ids = random_ids(33, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    before = snapshot(model)
    plain = gim_fast.explain(model, ids, attention_mask=mask, baseline_token_id=0, checkpointing=False)
    ckpt = gim_fast.explain(model, ids, attention_mask=mask, baseline_token_id=0, checkpointing=True)
    assert torch.equal(plain, ckpt)  # recomputation is deterministic: bit-identical
    assert_same_state(before, snapshot(model))


def test_checkpointing_really_recomputes(monkeypatch):
    model = tiny_model("llama", torch.float64)
    calls = []
    original = gim_fast.ops.gim_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gim_fast.ops, "gim_attention", counting)
    gim_fast.explain(model, random_ids(9), baseline_token_id=0, checkpointing=False)
    without = len(calls)
    gim_fast.explain(model, random_ids(9), baseline_token_id=0, checkpointing=True)
    assert without == 2 and len(calls) - without == 4  # each of the 2 layers runs again in the backward


def test_auto_checkpointing_follows_the_estimate(monkeypatch):
    model = tiny_model("qwen2", torch.float32)
    ids = random_ids(64)
    need = {ckpt: memory.estimate_memory(model.config, 64, dtype=torch.float32, checkpointing=ckpt,
                                          backend="torch").total for ckpt in (False, True)}
    assert need[True] < need[False]
    room = (need[True] + need[False]) / 2 / 0.9  # enough with checkpointing, not without
    monkeypatch.setattr(memory, "available_memory", lambda device: int(room))
    assert memory.plan_checkpointing(model, 64, 1, backend="torch", num_targets=1) is True
    monkeypatch.setattr(memory, "available_memory", lambda device: int(10 * need[False]))
    assert memory.plan_checkpointing(model, 64, 1, backend="torch", num_targets=1) is False
    gim_fast.explain(model, ids, baseline_token_id=0)


def test_refusal_is_fast_clear_and_leaves_the_model(monkeypatch):
    model = tiny_model("gemma2")
    before = snapshot(model)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    start = time.perf_counter()
    with pytest.raises(gim_fast.InsufficientMemoryError, match=r"needs about .* but only 1.0 MiB is free.*shorter"):
        gim_fast.explain(model, random_ids(200, batch=4), baseline_token_id=0)
    assert time.perf_counter() - start < 1.0
    assert_same_state(before, snapshot(model))


def test_eager_backend_at_long_context_is_refused_by_the_real_estimate():
    """300k tokens with the materialised backend would need ~6 TB for the S×S matrices: refused in < 1 s."""
    model = tiny_model("llama")
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(gim_fast.InsufficientMemoryError, match="backend='torch' or 'triton'"):
        gim_fast.explain(model, torch.ones(300_000, dtype=torch.long), baseline_token_id=0, backend="eager")
    assert time.perf_counter() - start < 1.0
    assert_same_state(before, snapshot(model))


def test_estimate_matches_the_design_numbers():
    """DESIGN §5: Llama-3.1-8B, bf16, 128k tokens: one layer ≈ 15 GB, per-layer checkpoints ≈ 34 GB."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    est = memory.estimate_memory(cfg, 131072, dtype=torch.bfloat16, checkpointing=True, device="cuda")
    assert est.parts["layer inputs (checkpoints)"] == 32 * 131072 * 4096 * 2  # 34.4 GB
    assert 12e9 < est.parts["one recomputed layer"] < 16e9  # 12.9 GB by the count in gim_fast.memory
    assert est.total + 16.06e9 < 81559 * 2**20  # with the 16 GB of weights: within an H100's 80 GB (81,559 MiB)
    without = memory.estimate_memory(cfg, 131072, dtype=torch.bfloat16, checkpointing=False)
    assert without.total > 400e9
    assert "total" in str(est) and "GiB" in str(est)


def test_bad_checkpointing_value():
    with pytest.raises(ValueError, match="checkpointing must be 'auto', True or False"):
        gim_fast.explain(tiny_model("llama"), random_ids(5), baseline_token_id=0, checkpointing="yes")
