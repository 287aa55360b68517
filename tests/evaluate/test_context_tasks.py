"""The written context tasks (``gim_fast.evaluate.context_tasks``) and the real ContextCite package as a method.

The tasks are checked by reading their documents (the gold one states the answer, the bridge of a multi-hop
question names the company, the conflicting one another value, the two banks share no name); the ContextCite
package is checked against this project's own copy of its surrogate (``cc_surrogate``): two independent
implementations of the same estimator on the same masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gim_fast.evaluate.context_tasks import DEFAULT_TASK_DOCUMENTS, SPLITS, TASKS, _BANKS, task_examples
from jobs_support import char_tokenizer
from model_state import assert_same_state, snapshot
from tiny_models import tiny_model


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_is_seeded_and_its_gold_document_states_the_answer(task, split):
    examples = task_examples(task, 5, split=split)
    assert examples == task_examples(task, 5, split=split)                  # the same every time
    assert examples != task_examples(task, 5, split=split, seed=1)
    for ex in examples:
        assert len(ex.sources) == DEFAULT_TASK_DOCUMENTS[task] and len(set(ex.sources)) == len(ex.sources)
        assert ex.answer in ex.sources[ex.gold] and ex.answer in ex.response and ex.gold in ex.needed
        for j in ex.against:                     # a document about the same relation with another value
            assert ex.answer not in ex.sources[j]
        if task == "multihop":
            bridge = next(j for j in ex.needed if j != ex.gold)
            company = next(c for c in _BANKS[split]["company"] if c in ex.sources[ex.gold])
            assert company in ex.sources[bridge] and ex.answer not in ex.sources[bridge]
            assert sum(ex.answer in s for s in ex.sources) == 1
        if task == "conflict":
            assert len(ex.needed) == 2 and all(ex.answer in ex.sources[j] for j in ex.needed)
        if task in ("entities", "many"):
            assert sum(ex.answer in s for s in ex.sources) == 1


def test_long_documents_and_many_documents():
    tok = char_tokenizer()
    for ex in task_examples("long", 3):
        assert sum(len(s) for s in ex.sources) > 8000            # about 2 000 tokens of a subword tokenizer
    assert len(task_examples("many", 1, documents=50)[0].sources) == 50
    with pytest.raises(ValueError, match="from 20 to 50"):
        task_examples("many", 1, documents=10)
    with pytest.raises(ValueError, match="unknown context task"):
        task_examples("nope", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        task_examples("entities", 1, split="test")
    assert tok is not None


def test_the_two_banks_share_no_word():
    dev, heldout = _BANKS["dev"], _BANKS["heldout"]
    for field in ("first", "last", "town", "company"):
        assert not set(dev[field]) & set(heldout[field]), field
    assert not {v[0] for v in dev["relations"].values()} & {v[0] for v in heldout["relations"].values()}


CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[bot] {% endif %}")


def test_the_contextcite_package_equals_the_projects_copy_of_its_surrogate():
    pytest.importorskip("context_cite")
    from gim_fast.evaluate.ablation import ContextAblations
    from gim_fast.evaluate.context_methods import run_method
    from gim_fast.sources import build_prompt

    tok = char_tokenizer()
    tok.chat_template = CHAT
    model = tiny_model("llama", torch.float32).eval()
    before = snapshot(model)
    sources = ["Lima is in Peru.", "Oslo is cold.", "Rome is old.", "Kyiv is big.", "Bern is calm."]
    prompt = build_prompt(tok, sources, "Where is Lima?")
    answer = tok.encode(" Peru", add_special_tokens=False)
    ablations = ContextAblations(model, tok, prompt, answer)
    package = run_method("contextcite_16", model, tok, ablations)
    assert package.forwards == 16 and package.backwards == 0
    copy = run_method("cc_surrogate", model, tok, ablations)
    assert_same_state(before, snapshot(model))
    assert tok.pad_token == "<pad>"                                   # the tokenizer is given back as it was
    # the copy uses 64 masks; on the package's first 16 the two fits must agree: refit the copy on them
    from gim_fast.evaluate.context_methods import contextcite_masks, lasso_surrogate, logit_probability

    masks = contextcite_masks(len(sources), 16)
    expected, _ = lasso_surrogate(masks, logit_probability(ablations(masks)), len(answer))
    np.testing.assert_allclose(package.scores, expected, atol=1e-4)
    assert copy.scores.shape == package.scores.shape


def test_the_contextcite_package_refuses_a_prompt_without_chat_template():
    pytest.importorskip("context_cite")
    from gim_fast.evaluate.ablation import ContextAblations
    from gim_fast.evaluate.context_methods import run_method
    from gim_fast.evaluate.unavailable import MethodUnavailable
    from gim_fast.sources import build_prompt

    tok = char_tokenizer()
    model = tiny_model("llama", torch.float32).eval()
    prompt = build_prompt(tok, ["a b.", "c d."], "e?")
    with pytest.raises(MethodUnavailable, match="chat template"):
        run_method("contextcite", model, tok, ContextAblations(model, tok, prompt, [5]))
