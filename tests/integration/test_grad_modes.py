"""explain() whatever the caller's grad mode: under torch.no_grad() and inside torch.inference_mode() it gives the
same scores as outside (gradients are enabled inside), a model built under inference mode is refused with a message
that says why and what to do, and the model is left exactly as it was in every case. And an empty input says so."""
import pytest
import torch

import gim_fast
from model_state import assert_same_state, snapshot
from tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_explain_under_no_grad_and_inference_mode(family, mode):
    model = tiny_model(family)
    ids = random_ids(9, seed=1)
    expected = gim_fast.explain(model, ids, baseline_token_id=0)
    before = snapshot(model)
    with mode():
        ids_inside = ids.clone()                 # under inference_mode an inference tensor
        batch = torch.stack([ids_inside, ids_inside])
        scores = gim_fast.explain(model, ids_inside, baseline_token_id=0)
        batched = gim_fast.explain(model, batch, attention_mask=torch.ones_like(batch), baseline_token_id=0)
    assert_same_state(before, snapshot(model))
    assert torch.is_grad_enabled()
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    torch.testing.assert_close(batched, torch.stack([expected, expected]), rtol=1e-5, atol=1e-6)
    assert not scores.is_inference() and scores.sum().isfinite()


def test_a_model_built_under_inference_mode_is_refused():
    with torch.inference_mode():
        model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"inference tensors .*torch\.inference_mode\(\).*load the model outside"):
        gim_fast.explain(model, random_ids(5), baseline_token_id=0)
    assert_same_state(before, snapshot(model))


def test_a_dataset_job_under_no_grad():
    from jobs_support import char_tokenizer

    model, tok = tiny_model("llama"), char_tokenizer()
    with torch.no_grad():
        rows = list(gim_fast.attribute_dataset(["hello", "abc"], model, tokenizer=tok))
    assert len(rows) == 2 and all(r.scores.shape == (len(r.token_ids),) for r in rows)


@pytest.mark.parametrize("empty", [[], [[]], torch.tensor([]), torch.empty(0, dtype=torch.long),
                                   torch.empty(2, 0)], ids=["list", "nested", "float", "long", "2d"])
def test_empty_input_says_it_is_empty(empty):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="input_ids is empty"):
        gim_fast.explain(model, empty, baseline_token_id=0)
