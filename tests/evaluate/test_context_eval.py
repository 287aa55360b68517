"""The context evaluation: answer log-probabilities under ablation, ContextCite's top-k drop and LDS against slow
hand-computed references, leave-one-out's exactness, the LASSO surrogate on a known linear target, the data, and
``gim-fast evaluate --task context`` end to end on a tiny model."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from gim_fast.evaluate.ablation import (ContextAblations, answer_logprobs, lds, random_masks, spearman, top_k_drop,
                                        top_k_sets)
from gim_fast.evaluate.context_methods import (contextcite_masks, lasso_surrogate, logit_probability, run_method)
from gim_fast.evaluate.context_run import gold_rank
from gim_fast.sources import build_prompt
from jobs_support import char_tokenizer, save_tiny
from model_state import assert_same_state, snapshot
from tiny_models import tiny_model

SOURCES = ["Lima is in Peru.", "Oslo is cold.", "Rome is old.", "Kyiv is big."]
QUERY = "Where is Lima?"


def _reference_logprob(model, prompt_ids, answer_ids) -> float:
    """log p(answer | prompt), one unpadded sequence, every logit, float64."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt_ids) - 1 + m, a]) for m, a in enumerate(answer_ids))


def test_answer_logprobs_of_padded_batches_equal_each_sequence_alone():
    model = tiny_model("gemma3", torch.float64).eval()      # sliding window 6 < the prompts: padding must not shift it
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 101, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1)]
    answer = [5, 7, 9]
    got = answer_logprobs(model, prompts, answer, batch_tokens=64)        # several batches, left-padded
    expected = [_reference_logprob(model, p, answer) for p in prompts]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert_same_state(before, snapshot(model))
    with pytest.raises(ValueError, match="answer_ids is empty"):
        answer_logprobs(model, prompts, [])


class FakeAblations:
    """An oracle with a known f(keep): the interface of ContextAblations."""

    def __init__(self, f, n, answer_tokens=1):
        self.f, self.n, self.answer_ids, self.calls = f, n, [0] * answer_tokens, 0

    def __call__(self, keep):
        keep = np.asarray(keep, dtype=bool).reshape(-1, self.n)
        self.calls += len(keep)
        return np.array([self.f(row) for row in keep])


def _f(row):      # not linear: an interaction between sources 0 and 2
    w = np.array([3.0, -1.0, 2.0, 0.5, 0.0, 1.5])
    return float(row @ w + 2.0 * row[0] * row[2] - 10.0)


def _ranks(values):
    """1-based ranks, ties sharing their mean rank (slow and obvious)."""
    values = list(values)
    out = []
    for v in values:
        below = sum(1 for u in values if u < v)
        equal = sum(1 for u in values if u == v)
        out.append(below + (equal + 1) / 2)
    return out


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_top_k_drop_against_a_hand_computed_reference():
    scores = [0.1, 5.0, 0.3, 0.3, -2.0, 4.0]      # a tie between sources 2 and 3: the earlier one first
    oracle = FakeAblations(_f, 6)
    assert top_k_sets(scores) == {1: (1,), 3: (1, 2, 5), 5: (0, 1, 2, 3, 5)}
    full = _f(np.ones(6))
    expected = {1: full - _f(np.array([1, 0, 1, 1, 1, 1])), 3: full - _f(np.array([1, 0, 0, 1, 1, 0])),
                5: full - _f(np.array([0, 0, 0, 0, 1, 0]))}
    assert top_k_drop(oracle, scores) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one value per source"):
        top_k_drop(oracle, [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        top_k_drop(oracle, [1.0, 2.0, 3.0, 4.0, 5.0, float("nan")])


def test_lds_against_a_hand_computed_spearman():
    scores = np.array([3.0, -1.0, 2.0, 0.5, 0.0, 1.5])
    oracle = FakeAblations(_f, 6)
    masks = random_masks(6, 32, seed="example")
    assert masks.shape == (32, 6) and 0.3 < masks.mean() < 0.7
    np.testing.assert_array_equal(masks, random_masks(6, 32, seed="example"))      # seeded by the key
    predicted = [float(m @ scores) for m in masks]
    actual = [_f(m) for m in masks]
    assert lds(oracle, scores, masks) == pytest.approx(_pearson(_ranks(predicted), _ranks(actual)), abs=1e-12)
    # ties (many equal predictions) get mean ranks; a constant prediction has no ranking: 0
    x, y = [1, 2, 2, 3, 3, 3, 4], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0, 0.0]
    assert spearman(x, y) == pytest.approx(_pearson(_ranks(x), _ranks(y)), abs=1e-12)
    assert lds(oracle, np.zeros(6), masks) == 0.0


def test_gold_rank_shares_ties():
    assert gold_rank([0.5, 2.0, 1.0], 0) == 3.0 and gold_rank([0.5, 2.0, 1.0], 1) == 1.0
    assert gold_rank([0.0, 0.0, 0.0, 1.0], 1) == 3.0      # tied with two others for places 2-4


def test_lasso_surrogate_recovers_known_linear_weights():
    pytest.importorskip("sklearn")
    n, weights, bias = 10, np.array([2.0, 0.0, -1.5, 0.0, 0.8, 0.0, 3.0, 0.0, -0.5, 1.0]), -4.0
    masks = contextcite_masks(n)
    assert masks.shape == (64, n) and masks.dtype == bool and 0.35 < masks.mean() < 0.65
    np.testing.assert_array_equal(masks, contextcite_masks(n))                     # ContextCite's fixed seeds
    for answer_tokens in (1, 7):
        got, got_bias = lasso_surrogate(masks, masks @ weights + bias, answer_tokens)
        np.testing.assert_allclose(got, weights, atol=0.06 * answer_tokens)        # L1 shrinkage, α = 0.01
        assert got_bias == pytest.approx(bias, abs=0.3 * answer_tokens)
        assert np.abs(got[weights == 0]).max() <= 0.02 * answer_tokens
    # through the method: the oracle gives log p with logit(p) linear in the mask; the surrogate recovers it
    def f(row):
        z = float(row @ weights + bias)
        return -math.log1p(math.exp(-z))             # log sigmoid(z): logit(p) = z
    oracle = FakeAblations(f, n, answer_tokens=3)
    result = run_method("contextcite", None, None, oracle)
    np.testing.assert_allclose(result.scores, weights, atol=0.2)
    assert result.forwards == 64 and result.backwards == 0 and oracle.calls == 64
    np.testing.assert_allclose(logit_probability([math.log(0.25)]), [math.log(1 / 3)])


def test_leave_one_out_is_exact():
    model = tiny_model("llama", torch.float64).eval()
    tok = char_tokenizer()
    prompt = build_prompt(tok, SOURCES, QUERY)
    answer = tok.encode(" Peru", add_special_tokens=False)
    ablations = ContextAblations(model, tok, prompt, answer, batch_tokens=128)
    result = run_method("leave_one_out", model, tok, ablations)
    full = _reference_logprob(model, tok(prompt.text).input_ids, answer)
    assert ablations.full == pytest.approx(full, rel=1e-10)
    for j in range(len(SOURCES)):
        text = "Context: " + "\n".join(s for i, s in enumerate(SOURCES) if i != j) + f"\n\nQuery: {QUERY}\nAnswer:"
        without = _reference_logprob(model, tok(text).input_ids, answer)
        assert result.scores[j] == pytest.approx(full - without, rel=1e-9, abs=1e-12)
    assert result.forwards == len(SOURCES) + 1 and ablations.forwards == len(SOURCES) + 1
    again = run_method("leave_one_out", model, tok, ablations)         # cached: no forward runs twice
    assert ablations.forwards == len(SOURCES) + 1 and np.array_equal(again.scores, result.scores)


def test_gim_and_gradient_methods_sum_token_scores_over_sources():
    import gim_fast

    model = tiny_model("llama", torch.float64).eval()
    tok = char_tokenizer()
    prompt = build_prompt(tok, SOURCES, QUERY)
    answer = tok.encode(" Peru", add_special_tokens=False)
    ablations = ContextAblations(model, tok, prompt, answer)
    got = run_method("gim", model, tok, ablations, backend="torch")
    table = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", per_token=False, backend="torch")
    np.testing.assert_allclose(got.scores, table["score"].to_numpy(), rtol=1e-12)
    assert (got.forwards, got.backwards) == (1, 1) and ablations.forwards == 0
    rand = run_method("random", model, tok, ablations, key="x")
    assert np.array_equal(rand.scores, run_method("random", model, tok, ablations, key="x").scores)
    with pytest.raises(ValueError, match="unknown context method"):
        run_method("lime", model, tok, ablations)


def test_context_examples():
    pytest.importorskip("country_capitals")
    from gim_fast.data import context_examples, countries

    capitals = {c.name: c.capital for c in countries()}
    for n in (2, 10, 100):
        examples = context_examples(n, seed=1)
        assert len(examples) == 193 and len({e.key for e in examples}) == 193
        for e in examples[:20]:
            assert len(e.sources) == n and len(set(e.sources)) == n
            country = e.query[len("What is the capital of "):-1]
            assert e.country == country
            assert e.sources[e.gold] == f"The capital of {country} is {capitals[country]}." == \
                f"The capital of {country} is {e.answer}."
            assert f"The ISO 3166 code of {country} is {e.key}." in e.sources
            assert sum(f"of {country} is" in s for s in e.sources) == 2      # the gold fact and its distractor
    assert context_examples(10, seed=1) == context_examples(10, seed=1) != context_examples(10, seed=2)
    with pytest.raises(ValueError, match="from 2 to 194"):
        context_examples(1)


@pytest.mark.parametrize("answer,capital,country,right", [
    ("The capital of Peru is Lima.", "Lima", "Peru", True),
    (" Lima.", "Lima", "Peru", True),
    ("The ISO 3166 code of Peru is PER.", "Lima", "Peru", False),
    ("The capital of Tunisia is Tunis.", "Tunis", "Tunisia", True),
    ("Tunisia is in North Africa.", "Tunis", "Tunisia", False),           # "Tunis" only inside "Tunisia"
    ("The capital of Guinea-Bissau is Bissau.", "Bissau", "Guinea-Bissau", True),
    ("The ISO 3166 code of Guinea-Bissau is GNB.", "Bissau", "Guinea-Bissau", False),
    # the committed run's false positives: a capital named as its country is never counted (see names_capital)
    ("Luxembourg is the capital of the European Union.", "Luxembourg", "Luxembourg", False),
    ("The ISO 3166 code of Luxembourg is LUX.", "Luxembourg", "Luxembourg", False),
    ("The capital of Kuwait is Kuwait City.", "Kuwait City", "Kuwait", True),
])
def test_an_answer_names_the_capital_not_only_the_country(answer, capital, country, right):
    from gim_fast.data import ContextExample, names_capital

    assert names_capital(answer, capital, country) is right
    example = ContextExample("XYZ", ("a", "b"), f"What is the capital of {country}?", 0, capital, country)
    assert example.is_answered_by(answer) is right


def test_evaluate_context_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("country_capitals")
    pytest.importorskip("sklearn")
    from gim_fast.cli import main

    tiny = save_tiny(tmp_path / "tiny", family="llama")
    out = tmp_path / "ctx"
    assert main(["evaluate", "--task", "context", "--models", str(tiny), "--documents", "3", "--counts", "2",
                 "--keep", "all", "--limit", "4", "--out", str(out), "--quiet"]) == 0
    for name in ("summary.csv", "examples.csv", "context.md", "run.json"):
        assert (out / name).is_file(), name
    import csv

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["gim", "grad_x_input", "leave_one_out", "contextcite", "random"]
    by = {r["method"]: r for r in rows}
    assert all(r["n"] == "2" and r["documents"] == "3" for r in rows)
    assert float(by["leave_one_out"]["forwards_per_answer"]) == 4
    assert float(by["contextcite"]["forwards_per_answer"]) == 64
    assert float(by["gim"]["backwards_per_answer"]) == 1
    for r in rows:
        assert -1 <= float(r["lds"]) <= 1 and 1 <= float(r["gold_rank"]) <= 3
    run = json.loads((out / "run.json").read_text())
    assert run["models"][0]["selections"][0]["asked"] <= 4 and "--keep all" in run["command"]
    md = (out / "context.md").read_text()
    assert "| `gim` |" in md
    from gim_fast.evaluate.context_report import markdown_context_table, read_context_results

    assert markdown_context_table(read_context_results(out)) in md        # the files hold everything the table says
    tables = itertools.groupby(md.splitlines(), key=lambda line: line.startswith("|"))
    for is_table, lines in tables:         # every row of a markdown table has the header's number of columns
        if is_table:
            counts = {line.count("|") for line in lines}
            assert len(counts) == 1, counts


@pytest.mark.parametrize("argv,message", [
    (["--methods", "gim", "integrated_gradients"], "unknown method 'integrated_gradients'"),
    (["--documents", "1"], "2 to 194 documents"),
    (["--documents", "10", "30", "--counts", "1", "2", "3"], "--counts has 3 values for 2"),
])
def test_evaluate_context_usage_errors(argv, message, capsys):
    from gim_fast.cli import main

    assert main(["evaluate", "--task", "context", *argv]) == 2
    assert message in capsys.readouterr().err


def test_each_distinct_mask_runs_once():
    model = tiny_model("llama").eval()
    tok = char_tokenizer()
    ablations = ContextAblations(model, tok, build_prompt(tok, SOURCES[:3], QUERY), [5, 6])
    masks = np.array(list(itertools.product([False, True], repeat=3)))
    first = ablations(np.concatenate([masks, masks]))
    assert ablations.forwards == 8
    np.testing.assert_array_equal(first[:8], first[8:])
    np.testing.assert_array_equal(ablations(masks[::-1]), first[:8][::-1])
    assert ablations.forwards == 8
