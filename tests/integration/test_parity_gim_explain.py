"""(c) Parity with gim-explain 0.1.4 where it applies GIM correctly on Hugging Face models (DESIGN §1):
GPT-2 with SDPA and the temperature off; GPT-2 with eager attention and the Q/K/V scaling off; Llama-family
with SDPA, norm freezing and the temperature off."""
from __future__ import annotations

import pytest
import torch

import gim_fast
from tiny_models import random_ids, tiny_model

gim = pytest.importorskip("gim", reason="gim-explain 0.1.4 (the `test` extra) is needed for parity tests")

CASES = {
    "gpt2-sdpa-no-temperature": ("gpt2", "sdpa", dict(softmax_temperature=None)),
    "gpt2-eager-no-qkv": ("gpt2", "eager", dict(q_scale=None, k_scale=None, v_scale=None)),
    "llama-sdpa-no-norm-no-temperature": ("llama", "sdpa", dict(freeze_norm=False, softmax_temperature=None)),
    "mistral-sdpa-no-norm-no-temperature": ("mistral", "sdpa", dict(freeze_norm=False, softmax_temperature=None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_gim_explain(case):
    family, attn, settings = CASES[case]
    model = tiny_model(family, torch.float32, attn_implementation=attn).eval()
    ids = random_ids(27, seed=8)
    theirs = gim.explain(model, ids, baseline_token_id=0, **settings)
    ours = gim_fast.explain(model, ids, baseline_token_id=0, gate_scale=None, up_scale=None, **settings)
    assert ours.shape == theirs.shape
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err <= 1e-5, err
    # And it is GIM, not the plain gradient, that both computed.
    plain = gim_fast.explain(model, ids, baseline_token_id=0, freeze_norm=False, softmax_temperature=None,
                             q_scale=None, k_scale=None, v_scale=None, gate_scale=None, up_scale=None)
    assert float((plain - theirs).abs().max() / theirs.abs().max()) > 1e-3
