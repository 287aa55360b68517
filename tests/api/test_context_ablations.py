"""``attribute_context(..., method="gim-ablations")`` and ``gim_fast.context_ablation``: the surrogate's fit against
numpy least squares on known targets, and the whole method on a tiny model against answer log-probabilities
computed one unpadded sequence at a time in float64."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.context_ablation import fit_surrogate, surrogate_masks
from jobs_support import char_tokenizer
from model_state import assert_same_state, snapshot
from tiny_models import tiny_model

SOURCES = ["Lima is in Peru.", "Oslo is cold.", "Rome is old.", "Kyiv is big."]
QUERY = "Where is Lima?"


def test_masks_are_seeded_halves_that_never_keep_everything():
    masks = surrogate_masks(3, 200, seed=5)
    assert masks.shape == (200, 3) and masks.dtype == bool and not masks.all(1).any()
    assert 0.35 < masks.mean() < 0.6
    np.testing.assert_array_equal(masks, surrogate_masks(3, 200, seed=5))
    assert not np.array_equal(masks, surrogate_masks(3, 200, seed=6))
    np.testing.assert_array_equal(surrogate_masks(4, 3, seed="a"), surrogate_masks(4, 3, seed="a"))


def test_a_prior_equal_to_a_linear_target_is_returned_unchanged():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=6), -3.0
    masks = surrogate_masks(6, 6, seed=1)
    f = lambda m: b + m.astype(float) @ w                     # noqa: E731 — exactly linear
    got = fit_surrogate(w, f(np.ones(6, bool)), masks, f(masks))
    np.testing.assert_allclose(got, w, atol=1e-10)
    # GIM's scores on another scale and with a common offset per source: the prior's fit recovers w
    got = fit_surrogate((w - 0.5) / 3.0, f(np.ones(6, bool)), masks, f(masks))
    np.testing.assert_allclose(got, w, atol=1e-10)


def test_without_a_prior_and_every_mask_the_fit_is_least_squares():
    n = 4
    rng = np.random.default_rng(1)
    w = rng.normal(size=n)
    every = np.array(list(itertools.product([False, True], repeat=n)))[:-1]       # all but the full mask
    f = lambda m: 1.0 + m.astype(float) @ w + 0.7 * (m[..., 0] & m[..., 2])       # noqa: E731 — an interaction
    got = fit_surrogate(np.zeros(n), f(np.ones(n, bool)), every, f(every), ridge=1e-12)
    points = np.r_[np.ones((1, n)), every.astype(float)]
    expected = np.linalg.lstsq(np.c_[points, np.ones(len(points))], f(points.astype(bool)), rcond=None)[0][:n]
    np.testing.assert_allclose(got, expected, atol=1e-8)
    # the penalty pulls every weight toward the prior (here 0 plus the fitted common offset)
    shrunk = fit_surrogate(np.zeros(n), f(np.ones(n, bool)), every, f(every), ridge=1e6)
    assert np.ptp(shrunk) < 1e-3 * np.ptp(expected)


def _logprob(model, prompt_ids, answer_ids) -> float:
    """log p(answer | prompt): one unpadded sequence, every logit, float64."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt_ids) - 1 + m, a]) for m, a in enumerate(answer_ids))


def test_gim_ablations_on_a_tiny_model_equal_the_surrogate_of_reference_ablations():
    tok = char_tokenizer()
    model = tiny_model("llama", torch.float64).eval()
    before = snapshot(model)
    gim = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0)
    table = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0,
                                       method="gim-ablations", ablations=5, seed=3)
    assert_same_state(before, snapshot(model))
    np.testing.assert_allclose(table["gim"].to_numpy(), gim["score"].to_numpy(), rtol=1e-12)
    prompt, answer = table.prompt, table.answer_ids
    masks = surrogate_masks(len(SOURCES), 5, seed=3)
    values = [_logprob(model, ids, answer) for ids in prompt.ablated_ids(tok, masks)]
    full = _logprob(model, prompt.input_ids, answer)
    expected = fit_surrogate(gim["score"].to_numpy(), full, masks, values)
    # Llama's RMSNorm computes in float32 even in a float64 model: the padded batches of the ablations and the
    # reference's single sequences agree to float32 rounding
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table["rank"], np.argsort(np.argsort(-expected, kind="stable")) + 1)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(method="lasso"), ValueError, "method must be one of 'gim', 'gim-ablations'"),
    (dict(method="gim-ablations", ablations=1), ValueError, "ablations must be an integer ≥ 2"),
    (dict(method="gim-ablations", ablations=True), ValueError, "ablations must be an integer ≥ 2"),
    (dict(method="gim-ablations", target="logit"), ValueError, "use target='logprob'"),
    (dict(method="gim-ablations", seed="x"), TypeError, "seed must be an integer"),
])
def test_bad_method_arguments_are_refused_before_the_model_runs(kwargs, error, message):
    tok = char_tokenizer()
    model = tiny_model("llama", torch.float32).eval()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", **kwargs)
    assert_same_state(before, snapshot(model))
