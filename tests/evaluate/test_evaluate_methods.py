"""The compared attribution methods: what each computes, batch independence, IG's completeness bookkeeping,
the random baseline's determinism (AttnLRP: tests/evaluate/test_attnlrp.py)."""
from __future__ import annotations

import pytest
import torch

import gim_fast
from gim_fast.evaluate.methods import METHODS, get_method, temperature_method
from tiny_models import random_ids, tiny_model

BASELINE = 7


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").eval()


def _targets(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1].argmax(-1).tolist()


def test_grad_x_input_is_plain_autograd(llama):
    ids = random_ids(9, batch=3, seed=2)
    targets = _targets(llama, ids)
    scores = METHODS["grad_x_input"].attribute(llama, ids, targets, BASELINE).scores
    embed = llama.get_input_embeddings()
    for row in range(3):
        e = embed(ids[row:row + 1]).detach().requires_grad_(True)
        logit = llama(inputs_embeds=e).logits[0, -1, targets[row]]
        (grad,) = torch.autograd.grad(logit, e)
        expected = (grad * (e - embed(torch.full_like(ids[row:row + 1], BASELINE)))).sum(-1)[0].detach()
        torch.testing.assert_close(scores[row], expected, rtol=1e-4, atol=1e-6)


def test_gim_variants_call_explain_with_their_settings(llama):
    ids = random_ids(8, batch=2, seed=3)
    targets = _targets(llama, ids)
    off = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
               gate_scale=None, up_scale=None)
    cases = {
        "gim": {},
        "freeze_norm_only": {**off, "freeze_norm": True},
        "temperature_only": {**off, "softmax_temperature": 2.0},
        "qkv_scaling_only": {**off, "q_scale": 0.25, "k_scale": 0.25, "v_scale": 0.5},
        "mlp_scaling_only": {**off, "gate_scale": 0.5, "up_scale": 0.5},
        "gim_t3": {"softmax_temperature": 3.0},
    }
    for name, settings in cases.items():
        method = get_method(name)
        assert method.settings == gim_fast.GIMSettings(**settings), name
        got = method.attribute(llama, ids, targets, BASELINE).scores
        want = gim_fast.explain(llama, ids, target_token_id=targets, baseline_token_id=BASELINE, **settings)
        torch.testing.assert_close(got, want)
    # each modification alone changes the scores (none is silently a no-op on this model)
    plain = METHODS["grad_x_input"].attribute(llama, ids, targets, BASELINE).scores
    for name in ("freeze_norm_only", "temperature_only", "qkv_scaling_only", "mlp_scaling_only"):
        assert not torch.allclose(METHODS[name].attribute(llama, ids, targets, BASELINE).scores, plain), name


def test_integrated_gradients_batch_and_completeness(llama):
    pytest.importorskip("captum")
    ids = random_ids(6, batch=3, seed=4)
    targets = _targets(llama, ids)
    ig = METHODS["integrated_gradients"]
    out = ig.attribute(llama, ids, targets, BASELINE)
    assert out.scores.shape == (3, 6)
    # captum's convergence delta is Σ scores − (f(x) − f(baseline)), with the logit difference we report
    gap, diff = out.extra["ig_completeness_gap"], out.extra["ig_logit_difference"]
    for row in range(3):
        assert gap[row] == pytest.approx(float(out.scores[row].sum()) - diff[row], abs=1e-3)
        alone = ig.attribute(llama, ids[row:row + 1], targets[row:row + 1], BASELINE)
        torch.testing.assert_close(alone.scores[0], out.scores[row], rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        f = llama(ids).logits[:, -1].gather(1, torch.tensor(targets)[:, None])[:, 0]
        fb = llama(torch.full_like(ids, BASELINE)).logits[:, -1].gather(1, torch.tensor(targets)[:, None])[:, 0]
    assert diff == pytest.approx((f - fb).tolist(), abs=1e-4)


def test_integrated_gradients_is_close_to_completeness_on_a_smooth_model():
    """On a 1-layer model IG with 50 steps nearly satisfies completeness (a check that it is IG at all)."""
    pytest.importorskip("captum")
    model = tiny_model("llama", num_hidden_layers=1, initializer_range=0.02).eval()
    ids = random_ids(5, batch=1, seed=5)
    out = METHODS["integrated_gradients"].attribute(model, ids, _targets(model, ids), BASELINE)
    assert abs(out.extra["ig_completeness_gap"][0]) < 0.05 * max(abs(out.extra["ig_logit_difference"][0]), 1e-3)


def test_random_is_seeded_per_example():
    random = METHODS["random"]
    ids = random_ids(5, batch=3)
    a = random.attribute(None, ids, [1, 2, 3], 0, example_keys=["x", "y", "z"], seed=0).scores
    b = random.attribute(None, ids[1:], [2, 3], 0, example_keys=["y", "z"], seed=0).scores
    torch.testing.assert_close(a[1:], b)
    assert (a >= 0).all() and not torch.equal(a[0], a[1])
    c = random.attribute(None, ids, [1, 2, 3], 0, example_keys=["x", "y", "z"], seed=1).scores
    assert not torch.equal(a, c)


def test_method_names():
    assert temperature_method(1.5).name == "gim_t1.5" and get_method("gim_t1.5").settings == gim_fast.GIMSettings(
        softmax_temperature=1.5)
    for bad in ("gim_t0", "gim_tx", "lime"):
        with pytest.raises(ValueError, match="unknown method"):
            get_method(bad)
