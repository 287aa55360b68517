"""gim_fast.evaluate's comprehensiveness and sufficiency against a slow, obviously-correct implementation (one
forward per perturbed sequence, written from the paper's evaluation loop), against hand-computed values on a model
whose logit is a known sum, and the batched evaluation runner against the per-sequence functions."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from gim_fast.evaluate import comprehensiveness, faithfulness, sufficiency
from gim_fast.evaluate.metrics import comprehensiveness_sets, ranking, sufficiency_sets
from tiny_models import VOCAB, random_ids, tiny_model

RATIOS = [0.5, 0.8, 0.9, 0.95, 0.99]


# ------------------------------------------------------------------------------------------ the slow reference


def slow_logit(model, ids: list[int], target: int, position: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    return float(logits[0, position, target].float())


def slow_order(scores, n: int) -> list[int]:
    """Positions 1 … n-2, highest score first, ties by position."""
    return sorted(range(1, n - 1), key=lambda p: (-float(scores[p]), p))


def slow_comprehensiveness(model, ids, scores, target, baseline, position=-1) -> float:
    ids = list(map(int, ids))
    full = slow_logit(model, ids, target, position)
    order = slow_order(scores, len(ids))
    drops = [0.0] * 50
    perturbed = list(ids)
    for k, p in enumerate(order[:50]):
        perturbed[p] = baseline                      # cumulative: the top k+1 replaced
        drops[k] = full - slow_logit(model, perturbed, target, position)
    return sum(drops) / 50 / full


def slow_sufficiency(model, ids, scores, target, baseline, position=-1) -> float:
    ids = list(map(int, ids))
    full = slow_logit(model, ids, target, position)
    least_first = slow_order(scores, len(ids))[::-1]
    drops = []
    for r in RATIOS:
        perturbed = list(ids)
        for p in least_first[:int(r * len(least_first))]:
            perturbed[p] = baseline
        drops.append(full - slow_logit(model, perturbed, target, position))
    return sum(drops) / len(drops) / full


# ------------------------------------------------------------------------------------------ tiny real models


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    model = tiny_model(request.param).eval()
    return model


def _target(model, ids, position=-1) -> int:
    with torch.no_grad():
        return int(model(ids[None]).logits[0, position].argmax())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 23, 60])
def test_metrics_match_slow_reference(tiny, n):
    ids = random_ids(n, seed=n)
    g = torch.Generator().manual_seed(100 + n)
    scores = torch.randn(n, generator=g)
    target, baseline = _target(tiny, ids), 3
    # the target logit must be far from 0 for the ratio to be well conditioned; shift by choosing the argmax
    comp = comprehensiveness(tiny, ids, scores, target, baseline)
    suff = sufficiency(tiny, ids, scores, target, baseline)
    assert comp == pytest.approx(slow_comprehensiveness(tiny, ids, scores, target, baseline), rel=1e-4, abs=1e-6)
    assert suff == pytest.approx(slow_sufficiency(tiny, ids, scores, target, baseline), rel=1e-4, abs=1e-6)
    both = faithfulness(tiny, ids, scores, target, baseline)
    assert both == pytest.approx((comp, suff), rel=1e-5, abs=1e-7)


def test_metrics_with_ties_other_position_and_small_batches(tiny):
    n = 12
    ids = random_ids(n, seed=5)
    scores = torch.tensor([3., 1., 1., 2., 1., 0., 2., 1., 1., 5., 0., 4.])   # many ties: stable by position
    target, baseline, position = _target(tiny, ids, 7), 1, 7
    for batch_rows in (1, 3, 64):
        comp = comprehensiveness(tiny, ids, scores, target, baseline, position, batch_rows=batch_rows)
        suff = sufficiency(tiny, ids, scores, target, baseline, target_position=position, batch_rows=batch_rows)
        assert comp == pytest.approx(slow_comprehensiveness(tiny, ids, scores, target, baseline, position), rel=1e-4,
                                     abs=1e-6)
        assert suff == pytest.approx(slow_sufficiency(tiny, ids, scores, target, baseline, position), rel=1e-4,
                                     abs=1e-6)


def test_real_model_capital_prompt(smollm2):
    import gim_fast

    model, tok = smollm2
    ids = tok("The capital of the country whose capital is Paris is France. The capital of France is",
              return_tensors="pt").input_ids[0]
    target = tok.encode(" Paris", add_special_tokens=False)[0]
    baseline = tok.encode(" ", add_special_tokens=False)[0]
    scores = gim_fast.explain(model, ids, target_token_id=target, baseline_token_id=baseline)
    comp, suff = faithfulness(model, ids, scores, target, baseline)
    assert comp == pytest.approx(slow_comprehensiveness(model, ids, scores, target, baseline), rel=1e-4, abs=1e-6)
    assert suff == pytest.approx(slow_sufficiency(model, ids, scores, target, baseline), rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------- a model with a known logit


class SumModel(torch.nn.Module):
    """logit(target) at every position = 10 + Σ_p w[p]·[x_p ≠ baseline]: the drops are sums of w by hand."""

    def __init__(self, weights, baseline):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 1)
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.baseline = baseline

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        present = (input_ids != self.baseline).double()
        value = 10.0 + (present * self.w).sum(-1)                 # [R]
        logits = torch.zeros(input_ids.shape[0], 1, 4, dtype=torch.float64)
        logits[:, 0, 2] = value
        return SimpleNamespace(logits=logits)


def test_hand_computed_values():
    #        pos: 0    1    2    3    4    5
    w = [100.0, 4.0, 1.0, 2.0, 3.0, 100.0]     # first and last never replaced, so their weight never drops
    model = SumModel(w, baseline=0)
    ids = torch.tensor([5, 5, 5, 5, 5, 5])
    full = 10 + sum(w)                          # 220
    scores = torch.tensor([9.0, 0.4, 0.1, 0.2, 0.3, 9.0])   # ranking of 1..4: 1 (0.4), 4, 3, 2
    assert ranking(scores) == [1, 4, 3, 2]
    # comprehensiveness: drops 4, 4+3, 4+3+2, 4+3+2+1, then 46 zeros
    assert comprehensiveness(model, ids, scores, 2, 0) == pytest.approx((4 + 7 + 9 + 10) / 50 / full)
    # sufficiency: m = 4, int(r·4) = 2, 3, 3, 3, 3 least important: {2, 3} drop 3, {2, 3, 4} drop 6
    assert [len(s) for s in sufficiency_sets(scores)] == [2, 3, 3, 3, 3]
    assert sufficiency(model, ids, scores, 2, 0) == pytest.approx((3 + 6 * 4) / 5 / full)
    # a perfect and a reversed ranking: more comprehensive, less sufficient
    assert comprehensiveness_sets(scores)[0] == (1,)


def test_sets_follow_the_papers_loop():
    g = torch.Generator().manual_seed(0)
    for n in (3, 5, 12, 53, 103):
        scores = torch.randn(n, generator=g)
        order = slow_order(scores, n)
        assert comprehensiveness_sets(scores) == [tuple(order[:k]) for k in range(1, min(50, n - 2) + 1)]
        assert sufficiency_sets(scores) == [tuple(order[::-1][:int(r * (n - 2))]) for r in RATIOS]
    assert comprehensiveness_sets(torch.ones(2)) == [] and sufficiency_sets(torch.ones(2)) == [()] * 5


def test_bad_inputs(tiny):
    ids = random_ids(6)
    with pytest.raises(ValueError, match="one value per token"):
        comprehensiveness(tiny, ids, torch.zeros(5), 1, 0)
    with pytest.raises(ValueError, match="one sequence"):
        sufficiency(tiny, ids.repeat(2, 1), torch.zeros(2, 6), 1, 0)
    with pytest.raises(ValueError, match="out of range"):
        comprehensiveness(tiny, ids, torch.randn(6), 1, 0, target_position=6)


# ------------------------------------------------------------------------------ the batched evaluation runner


def word_tokenizer():
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0")


def test_runner_matches_per_sequence_metrics(tmp_path):
    from gim_fast.evaluate.run import evaluate_model

    model, tok = tiny_model("qwen2").eval(), word_tokenizer()
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(7):
            n = [4, 9, 9, 14, 4, 9, 61][i]
            words = " ".join(f"t{int(t)}" for t in torch.randint(1, VOCAB, (n,), generator=g))
            f.write(json.dumps({"text": words}) + "\n")
    result = evaluate_model("tiny-qwen2", ["gim", "grad_x_input", "random"], n=None, data=str(path),
                            temperatures=(1.0, 2.0), batch_size=2, batch_rows=7, model_and_tokenizer=(model, tok))
    assert set(result.methods) == {"gim", "grad_x_input", "random", "gim_t1", "gim_t2"}
    assert result.methods["gim_t2"] is result.methods["gim"]
    examples = result.selection.examples
    assert len(examples) == 7 and result.methods["gim"].n == 7
    import gim_fast
    from gim_fast.evaluate.methods import get_method

    for name in ("gim", "grad_x_input", "random", "gim_t1"):
        for i, ex in enumerate(examples):
            scores = get_method(name).attribute(model, ex.input_ids[None], [ex.target_id], 0,
                                                example_keys=[ex.key]).scores[0]
            if name == "gim":
                torch.testing.assert_close(scores, gim_fast.explain(model, ex.input_ids, target_token_id=ex.target_id,
                                                                    baseline_token_id=0))
            comp, suff = faithfulness(model, ex.input_ids, scores, ex.target_id, 0)
            assert result.methods[name].comprehensiveness[i] == pytest.approx(comp, rel=1e-4, abs=1e-6)
            assert result.methods[name].sufficiency[i] == pytest.approx(suff, rel=1e-4, abs=1e-6)
