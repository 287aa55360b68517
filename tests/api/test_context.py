"""``attribute_context`` and ``gim_fast.sources``: prompts from sources, character-offset spans, shared tokens, the
table of sources, bad input.

The reference for a source's score is independent of the code under test: the whole answer's log-probability
differentiated under the hook-based reference GIM (``reference_gim``), gradient × (input − baseline) per token, and
the tokens of a source found by locating its text in the prompt with ``str.find`` (the character tokenizer makes
one token per character).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.sources import DEFAULT_PLAIN_TEMPLATE, PromptFormat, build_prompt, check_template
from jobs_support import char_tokenizer
from model_state import assert_same_state, snapshot
from reference_gim import reference_gim
from tiny_models import tiny_model

SOURCES = ["Lima is in Peru.", "Oslo is cold.", "Rome is old."]
QUERY = "Where is Lima?"
CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[bot] {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = char_tokenizer()
    t.chat_template = CHAT
    return t


def _bpe(merges: list[tuple[str, str]]):
    """A BPE tokenizer over printable ASCII with the given merges (for tokens that straddle two sources)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


# ----------------------------------------------------------------------------------------- prompt and spans


def test_spans_locate_every_source_and_the_query(tok, chat_tok):
    for t, chat in ((tok, False), (chat_tok, True)):
        p = build_prompt(t, SOURCES, QUERY)
        assert p.chat is chat
        assert [p.text[s:e] for s, e in p.source_spans] == SOURCES
        assert p.text[slice(*p.query_span)] == QUERY
        assert t(p.text, add_special_tokens=not chat).input_ids == p.input_ids
        w = p.weights()
        assert w.shape == (len(p.input_ids), len(SOURCES) + 2)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
        for j, (s, e) in enumerate(p.source_spans):      # one character per token: whole tokens
            inside = [k for k, (a, b) in enumerate(p.offsets) if s <= a and b <= e and b > a]
            assert sorted(np.flatnonzero(w[:, j] == 1.0)) == inside
            assert w[:, j].sum() == pytest.approx(len(SOURCES[j]))
    chat_prompt = build_prompt(chat_tok, SOURCES, QUERY)
    assert chat_prompt.text.startswith("<s>[user] Context: Lima is in Peru.\nOslo")
    assert chat_prompt.text.endswith(f"Query: {QUERY}</s><s>[bot] ")
    plain = build_prompt(chat_tok, SOURCES, QUERY, chat=False)
    assert plain.text == DEFAULT_PLAIN_TEMPLATE.format(context="\n".join(SOURCES), query=QUERY)


def test_a_token_shared_by_two_sources_is_split_by_its_characters():
    t = _bpe([("a", "b"), (" ", "T")])
    # "...xa" + "by..." with no separator: the token "ab" is half in each source
    p = build_prompt(t, ["xa", "by"], "q?", template="{context}|{query}", separator="")
    pieces = [p.text[a:b] for a, b in p.offsets]
    k = pieces.index("ab")
    np.testing.assert_allclose(p.weights()[k], [0.5, 0.5, 0.0, 0.0])
    # " T" straddles the separator " " and the source "The": whitespace does not count, so it is wholly the source's
    p = build_prompt(t, ["x", "The"], "q?", template="{context}|{query}", separator=" ")
    pieces = [p.text[a:b] for a, b in p.offsets]
    k = pieces.index(" T")
    np.testing.assert_allclose(p.weights()[k], [0.0, 1.0, 0.0, 0.0])
    # a token made only of whitespace counts all its characters: the separator's own token is "other"
    p = build_prompt(t, ["x", "y"], "q?", template="{context}|{query}", separator="  ")
    blank = [k for k, (a, b) in enumerate(p.offsets) if p.text[a:b].isspace()]
    assert blank and all(p.weights()[k, -1] == 1.0 for k in blank)


def test_ablated_prompts_are_rebuilt_from_the_kept_sources(tok, chat_tok):
    for t in (tok, chat_tok):
        p = build_prompt(t, SOURCES, QUERY)
        keep = [[True, False, True], [False, False, False], [True, True, True]]
        got = p.ablated_ids(t, keep)
        fmt = p.format
        for row, ids in zip(keep, got):
            kept = [s for s, k in zip(SOURCES, row) if k]
            text = fmt.template.format(context="\n".join(kept), query=QUERY)
            if fmt.chat:
                text = t.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
            assert ids == t(text, add_special_tokens=not fmt.chat).input_ids
        assert got[2] == p.input_ids


@pytest.mark.parametrize("template,message", [
    ("Context: {query}", "no place for the sources"),
    ("{context} {context} {query}", "2 places for the sources"),
    ("{context}", "no place for the query"),
    ("{context} {query} {other}", "the field {other}"),
    ("{context} {query:>5}", "the field {query:>5}"),
    ("{context {query}", "not a valid format string"),
])
def test_bad_templates(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)
    with pytest.raises(TypeError, match="template must be a string"):
        check_template(3)


def test_a_chat_template_that_rewrites_the_message_is_refused():
    t = char_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="changes the message text"):
        build_prompt(t, SOURCES, QUERY)
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(char_tokenizer(), SOURCES, QUERY, chat=True)


# ----------------------------------------------------------------------------------------- attribute_context


def _reference_sources(model, tok, prompt_text: str, answer: str, sources, baseline: int, gim: bool):
    """Per source: Σ over its characters' tokens of gradient × (input − baseline) of log p(answer), the gradient
    taken under the hook-based reference GIM (or plain autograd); the answer tokenized alone after the prompt."""
    ids = tok(prompt_text).input_ids
    answer_ids = tok.encode(answer, add_special_tokens=False)
    full = torch.tensor([ids + answer_ids])
    embed = model.get_input_embeddings()
    e = embed(full).detach().requires_grad_(True)
    with reference_gim(model) if gim else torch.enable_grad():
        logp = model(inputs_embeds=e, use_cache=False).logits[0].log_softmax(-1)
        total = sum(logp[len(ids) - 1 + m, a] for m, a in enumerate(answer_ids))
        (grad,) = torch.autograd.grad(total, e)
    token = (grad * (e.detach() - embed(torch.full_like(full, baseline)))).sum(-1)[0]
    offsets = tok(prompt_text, return_offsets_mapping=True).offset_mapping
    out = []
    for s in sources:
        start = prompt_text.find(s)
        out.append(sum(float(token[k].detach()) for k, (a, b) in enumerate(offsets) if start <= a < start + len(s)))
    return np.array(out), float(token.detach().sum())


@pytest.mark.parametrize("gim", [True, False], ids=["gim", "plain"])
def test_source_scores_equal_the_reference(tok, gim):
    model = tiny_model("llama", torch.float64).eval()
    before = snapshot(model)
    settings = {} if gim else dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None,
                                   v_scale=None, gate_scale=None, up_scale=None)
    table = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0, **settings)
    assert_same_state(before, snapshot(model))
    expected, total = _reference_sources(model, tok, table.prompt.text, " Peru", SOURCES, 0, gim)
    # per_token=True sums the M per-token rows; without norm freezing, Llama's own RMSNorm computes in float32
    # even in a float64 model, so the sum of the rows and the one backward of the sum differ by float32 rounding
    rtol = 1e-9 if gim else 1e-5
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=rtol, atol=1e-12)
    assert list(table["source"]) == SOURCES and table.answer == " Peru" and len(table.answer_tokens) == 5
    assert table["score"].sum() + table.rest.sum() == pytest.approx(total, rel=rtol)   # everything accounted for
    np.testing.assert_array_equal(table["rank"], np.argsort(np.argsort(-expected, kind="stable")) + 1)
    # the per-token rows add up to the whole answer (the backward is linear), and per_token() ranks them
    np.testing.assert_allclose(table.token_scores.sum(axis=0).to_numpy()[:3], expected, rtol=rtol, atol=1e-12)
    whole = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0, per_token=False,
                                       **settings)
    np.testing.assert_allclose(whole["score"].to_numpy(), expected, rtol=1e-9, atol=1e-12)
    assert whole.token_scores is None
    with pytest.raises(ValueError, match="per_token=False"):
        whole.per_token()
    top = table.per_token(k=2)
    scores = table.token_scores.iloc[:, :3].to_numpy()
    assert list(top["token"]) == list(table.answer_tokens)
    for m in range(len(top)):
        order = np.argsort(-scores[m], kind="stable")
        assert [top["source_1"][m], top["source_2"][m]] == order[:2].tolist()
        assert top["score_1"][m] == scores[m, order[0]]
    assert type(table.sort_values("score")).__name__ == "ContextAttribution"   # derived tables keep the answer


def test_the_table_survives_ordinary_pandas_use(tok):
    """Issue 22, defect 3: an index and a column both named "source" made sort_values/groupby/merge ambiguous and
    reset_index fail; derived tables lost the answer and per_token."""
    import pandas as pd

    model = tiny_model("llama", torch.float64).eval()
    table = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0)
    assert table.index.name == "source_id" and list(table.index) == [0, 1, 2]
    by_text = table.sort_values("source")
    assert list(by_text["source"]) == sorted(SOURCES) and by_text.answer == " Peru"
    assert table.groupby("source")["score"].sum().to_dict() == dict(zip(table["source"], table["score"]))
    merged = table.merge(pd.DataFrame({"source": SOURCES, "year": [1535, 1048, -753]}), on="source")
    assert list(merged["year"]) == [1535, 1048, -753] and list(merged["score"]) == list(table["score"])
    flat = table.reset_index()
    assert list(flat["source_id"]) == [0, 1, 2] and flat.answer == " Peru"
    assert table.copy().answer == " Peru" and table.copy().token_scores is table.token_scores
    # per_token() of a derived table ranks the sources it holds, by their ids, against the full per-token matrix
    scores = table.token_scores.iloc[:, :3].to_numpy()
    for derived in (table.copy(), by_text, flat, table[["score"]], flat.sort_values("score")):
        pd.testing.assert_frame_equal(derived.per_token(k=3), table.per_token(k=3))
    keep = table["source"] != SOURCES[1]
    top = table[keep].per_token(k=2)
    for m in range(len(top)):
        kept = [0, 2]
        order = [kept[j] for j in np.argsort(-scores[m, kept], kind="stable")]
        assert [top["source_1"][m], top["source_2"][m]] == order and top["score_1"][m] == scores[m, order[0]]
    with pytest.raises(ValueError, match="no 'source_id' index or column"):
        merged.per_token()


def test_generated_answer_is_the_models_greedy_continuation(chat_tok):
    model = tiny_model("qwen3", torch.float32).eval()
    model.generation_config.eos_token_id = 3          # the char tokenizer's </s>
    before = snapshot(model)
    table = gim_fast.attribute_context(model, chat_tok, SOURCES, QUERY, max_new_tokens=5)
    assert_same_state(before, snapshot(model))
    ids = torch.tensor([table.prompt.input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
    expected = out[:out.index(3)] if 3 in out else out
    assert table.answer_ids == expected and table.attribution.scores.shape[0] == len(expected)
    with pytest.raises(TypeError, match="generate keywords apply only"):
        gim_fast.attribute_context(model, chat_tok, SOURCES, QUERY, "x", do_sample=True)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(sources=[]), ValueError, "sources is empty"),
    (dict(sources=["a", ""]), ValueError, "source 1 is empty"),
    (dict(sources=["a", "   "]), ValueError, r"source 1 is empty \(only whitespace\)"),
    (dict(sources="one text"), TypeError, r"wrap a single text in a list"),
    (dict(sources=["a", 3]), TypeError, "source 1 is a int"),
    (dict(query=""), ValueError, "query is empty"),
    (dict(template="Sources: {query}"), ValueError, "no place for the sources"),
    (dict(answer=""), ValueError, "answer is empty"),
    (dict(answer=5), TypeError, "answer must be a string"),
    (dict(target="prob"), ValueError, "target must be one of"),
    (dict(max_new_tokens=0, answer=None), ValueError, "max_new_tokens must be a positive integer"),
    (dict(q_scale=-1), ValueError, "q_scale must be a finite number >= 0"),
    (dict(sources=["x" * 300]), ValueError, "positions end at 256"),
])
def test_bad_input_is_refused_and_the_model_untouched(tok, kwargs, error, message):
    model = tiny_model("llama")
    before = snapshot(model)
    call = {"sources": SOURCES, "query": QUERY, "answer": " Peru", **kwargs}
    with pytest.raises(error, match=message):
        gim_fast.attribute_context(model, tok, call.pop("sources"), call.pop("query"), **call)
    assert_same_state(before, snapshot(model))


def test_prompt_format_rejects_bad_arguments(tok):
    with pytest.raises(TypeError, match="separator must be a string"):
        PromptFormat.resolve(tok, separator=None)
    with pytest.raises(TypeError, match="chat must be True, False or None"):
        PromptFormat.resolve(tok, chat="yes")


def test_save_html(tok, tmp_path):
    model = tiny_model("llama").eval()
    table = gim_fast.attribute_context(model, tok, SOURCES, QUERY, " Peru", baseline_token_id=0)
    page = table.save_html(tmp_path / "ctx.html").read_text(encoding="utf-8")
    assert page.count('class="src"') == 3 and page.count('class="ans a') == 5 and "Where is Lima?" in page
