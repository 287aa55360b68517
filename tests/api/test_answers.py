"""``explain_answer`` / ``explain_generation``: every answer token × every token from one forward pass.

Row m must equal ``explain`` on the prefix that ends just before answer token m (a causal model sees nothing
after it), for every family and backend, padded batches included; ``target="logprob"`` is checked against the
independent hook-based reference GIM (``reference_gim``) on the prefix; ``total=True`` is the sum of the rows,
computed with one backward pass; the chunk size changes nothing but speed and memory.
"""
from __future__ import annotations

import pytest
import torch

import gim_fast
from model_state import assert_same_state, snapshot
from reference_gim import reference_gim
from tiny_models import FAMILIES, VOCAB, random_ids, tiny_model

PROMPT, ANSWER = random_ids(9, seed=1), random_ids(4, seed=2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def prefix_rows(model, prompt, answer, **kwargs):
    """Row m by ``explain`` on (prompt + answer)[: P + m], padded with zeros to P + M columns."""
    full = torch.cat([prompt, answer])
    rows = []
    for m in range(len(answer)):
        row = gim_fast.explain(model, full[:len(prompt) + m], target_token_id=int(answer[m]), **kwargs)
        rows.append(torch.cat([row, row.new_zeros(len(full) - len(row))]))
    return torch.stack(rows)


def reference_logprob_rows(model, prompt, answer, baseline):
    """Row m: gradient × (input − baseline) of log p(answer[m] | prefix) under the hook-based reference GIM."""
    model.eval()
    embed = model.get_input_embeddings()
    full = torch.cat([prompt, answer])
    rows = []
    for m in range(len(answer)):
        ids = full[None, :len(prompt) + m]
        e = embed(ids).detach().requires_grad_(True)
        with reference_gim(model):
            logprob = model(inputs_embeds=e, use_cache=False).logits[0, -1].log_softmax(-1)[answer[m]]
            (grad,) = torch.autograd.grad(logprob, e)
        row = (grad * (e.detach() - embed(torch.full_like(ids, baseline)))).sum(-1)[0]
        rows.append(torch.cat([row, row.new_zeros(len(full) - len(row))]))
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_rows_equal_explain_on_the_prefix(family, backend):
    model = tiny_model(family, torch.float64)
    before = snapshot(model)
    result = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, backend=backend)
    expected = prefix_rows(model, PROMPT, ANSWER, baseline_token_id=0, backend=backend)
    assert result.scores.shape == (4, 13) and result.scores.dtype == torch.float64
    assert rel_err(result.scores, expected) <= 1e-10
    for m in range(4):
        assert bool((result.scores[m, 9 + m:] == 0).all())
    assert torch.equal(result.target_ids, ANSWER)
    assert torch.equal(result.target_positions, torch.arange(8, 12))
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_logprob_rows_equal_the_reference(family):
    model = tiny_model(family, torch.float64)
    result = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, target="logprob")
    assert rel_err(result.scores, reference_logprob_rows(model, PROMPT, ANSWER, 0)) <= 1e-10
    # the reported values are the model's own
    with torch.no_grad():
        logits = model.eval()(torch.cat([PROMPT, ANSWER])[None]).logits[0, 8:12]
    assert torch.allclose(result.target_logits, logits[torch.arange(4), ANSWER].float())
    assert torch.allclose(result.target_logprobs, logits.log_softmax(-1)[torch.arange(4), ANSWER].float())


@pytest.mark.parametrize("target", ["logit", "logprob"])
def test_total_is_the_sum_of_the_rows_from_one_backward(target, monkeypatch):
    model = tiny_model("qwen3", torch.float64)
    rows = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, target=target)
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    total = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, target=target, total=True)
    assert len(calls) == 1
    assert total.scores.shape == (1, 13)
    assert rel_err(total.scores[0], rows.scores.sum(0)) <= 1e-12


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_padded_batch_equals_one_row_at_a_time(family):
    """Left- and right-padded prompts, answers of different lengths: each row as when alone."""
    model = tiny_model(family, torch.float64)
    prompts = [random_ids(7, seed=3), random_ids(11, seed=4), random_ids(5, seed=5)]
    answers = [random_ids(3, seed=6), random_ids(1, seed=7), random_ids(4, seed=8)]
    p_len, a_len = 11, 4
    prompt_ids = torch.zeros(3, p_len, dtype=torch.long)
    prompt_mask = torch.zeros(3, p_len, dtype=torch.long)
    answer_ids = torch.full((3, a_len), -100)
    answer_mask = torch.zeros(3, a_len, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if i == 2:  # right-padded prompt
            prompt_ids[i, :len(p)], prompt_mask[i, :len(p)] = p, 1
        else:       # left-padded
            prompt_ids[i, p_len - len(p):], prompt_mask[i, p_len - len(p):] = p, 1
        answer_ids[i, :len(a)], answer_mask[i, :len(a)] = a, 1
    for target in ("logit", "logprob"):
        batch = gim_fast.explain_answer(model, prompt_ids, answer_ids, attention_mask=prompt_mask,
                                        answer_mask=answer_mask, baseline_token_id=0, target=target)
        assert batch.scores.shape == (3, a_len, p_len + a_len)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            alone = gim_fast.explain_answer(model, p, a, baseline_token_id=0, target=target)
            columns = torch.cat([prompt_mask[i], answer_mask[i]]).bool()
            got = batch.scores[i][:len(a)][:, columns]
            assert rel_err(got, alone.scores) <= 1e-10, (target, i)
            assert bool((batch.scores[i][len(a):] == 0).all()) and bool((batch.scores[i][:, ~columns] == 0).all())
            assert torch.allclose(batch.target_logprobs[i, :len(a)], alone.target_logprobs)
            assert bool((batch.target_logprobs[i, len(a):] == 0).all())


def test_one_answer_for_a_batch_of_prompts():
    model = tiny_model("mistral", torch.float64)
    prompts = random_ids(6, batch=2, seed=9)
    batch = gim_fast.explain_answer(model, prompts, ANSWER, baseline_token_id=0)
    for i in range(2):
        alone = gim_fast.explain_answer(model, prompts[i], ANSWER, baseline_token_id=0)
        assert rel_err(batch.scores[i], alone.scores) <= 1e-12


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunk_changes_nothing(chunk):
    model = tiny_model("gemma3", torch.float64)
    whole = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, chunk=4)
    parts = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, chunk=chunk)
    assert rel_err(parts.scores, whole.scores) <= 1e-12


def test_checkpointing_changes_nothing():
    model = tiny_model("llama", torch.float64)
    plain = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, checkpointing=False)
    ckpt = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0, checkpointing=True)
    assert rel_err(ckpt.scores, plain.scores) <= 1e-12


class CharTokenizer:
    """Token i is the character chr(ord('a') + i % 26); enough for decode() and the baseline."""

    pad_token_id = 0
    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) - ord("a")) % (VOCAB - 1) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def __call__(self, text, return_tensors=None):
        return type("Encoding", (), {"input_ids": torch.tensor([self.encode(text)])})()


def test_tokens_and_views():
    model = tiny_model("llama", torch.float64)
    result = gim_fast.explain_answer(model, PROMPT, ANSWER, tokenizer=CharTokenizer())
    tok = CharTokenizer()
    assert result.tokens == [tok.decode([int(i)]) for i in torch.cat([PROMPT, ANSWER])]
    assert result.prompt_length == 9
    assert torch.equal(result.prompt_scores, result.scores[:, :9])
    assert torch.equal(result.answer_scores, result.scores[:, 9:])


def test_generation_is_greedy_stops_at_eos_and_is_explained():
    model = tiny_model("llama", torch.float64)
    before = snapshot(model)
    tok = CharTokenizer()
    prompt = "thecapital"
    ids = torch.tensor(tok.encode(prompt))
    with torch.no_grad():  # greedy by hand
        seq = ids.clone()
        for _ in range(5):
            seq = torch.cat([seq, model.eval()(seq[None]).logits[0, -1].argmax()[None]])
    model.train()
    greedy = seq[len(ids):]
    never = next(t for t in range(VOCAB) if t not in greedy.tolist())  # an end-of-sequence token never generated
    result = gim_fast.explain_generation(model, tok, prompt, max_new_tokens=5, baseline_token_id=0,
                                         eos_token_id=never)
    assert torch.equal(result.target_ids, greedy)
    expected = gim_fast.explain_answer(model, ids, greedy, baseline_token_id=0)
    assert torch.equal(result.scores, expected.scores)
    # an end-of-sequence token ends the answer (and is not part of it)
    first = next(i for i in range(1, 5) if greedy[i] not in greedy[:i])
    cut = gim_fast.explain_generation(model, tok, prompt, max_new_tokens=5, baseline_token_id=0,
                                      eos_token_id=int(greedy[first]))
    assert torch.equal(cut.target_ids, greedy[:first])
    assert_same_state(before, snapshot(model))


BAD = {
    "empty answer": (dict(answer_ids=[]), ValueError, "answer_ids is empty"),
    "answer token too large": (dict(answer_ids=[3, VOCAB]), ValueError, "answer_ids hold ids outside the vocabulary"),
    "answer token negative": (dict(answer_ids=[-1]), ValueError, "answer_ids hold ids outside the vocabulary"),
    "prompt token too large": (dict(prompt_ids=[VOCAB]), ValueError, "prompt_ids hold ids outside"),
    "too long": (dict(prompt_ids=random_ids(250), answer_ids=random_ids(7)), ValueError,
                 r"prompt \+ answer is 257 tokens .* positions end at 256"),
    "empty prompt": (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
    "2-D answer for 1-D prompt": (dict(answer_ids=random_ids(3, batch=2)), ValueError, "answer_ids is 2-D"),
    "answers for other batch": (dict(prompt_ids=random_ids(5, batch=2), answer_ids=random_ids(3, batch=3)),
                                ValueError, "3 rows for 2 prompts"),
    "answer mask left-padded": (dict(answer_ids=[1, 2, 3], answer_mask=[0, 1, 1]), ValueError, "right-padded"),
    "answer mask shape": (dict(answer_ids=[1, 2, 3], answer_mask=[1, 1]), ValueError, "shape of answer_ids"),
    "float answer": (dict(answer_ids=torch.tensor([1.0])), TypeError, "answer_ids must hold integer"),
    "bad target": (dict(target="prob"), ValueError, "target must be one of 'logit', 'logprob'"),
    "bad total": (dict(total=1), TypeError, "total must be True or False"),
    "bad chunk": (dict(chunk=0), ValueError, "chunk must be a positive int"),
    "float chunk": (dict(chunk=2.5), TypeError, "chunk must be a positive int"),
    "bad temperature": (dict(softmax_temperature=0), ValueError, "softmax_temperature"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_the_model_untouched(case):
    kwargs, error, message = BAD[case]
    kwargs = dict(dict(prompt_ids=PROMPT, answer_ids=ANSWER, baseline_token_id=0), **kwargs)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        gim_fast.explain_answer(model, **kwargs)
    assert_same_state(before, snapshot(model))


def test_bad_generation_input():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(254\) exceeds .* \(256\)"):
        gim_fast.explain_generation(model, CharTokenizer(), "abc", max_new_tokens=254, baseline_token_id=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        gim_fast.explain_generation(model, CharTokenizer(), "abc", max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt must be a non-empty string"):
        gim_fast.explain_generation(model, CharTokenizer(), "", max_new_tokens=3)
    first = int(model.eval()(torch.tensor([CharTokenizer().encode("abc")])).logits[0, -1].argmax())
    model.train()
    with pytest.raises(ValueError, match="generated no answer tokens"):
        gim_fast.explain_generation(model, CharTokenizer(), "abc", max_new_tokens=3, eos_token_id=first,
                                    baseline_token_id=0)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_rows_equal_explain_on_the_prefix(family):
    """The fused kernels (the interpreter on the CPU): a padded batch, its cotangents stacked through one forward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(family, torch.float32).to(device)
    prompts = random_ids(7, batch=2, seed=10)
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    answer = random_ids(3, seed=11)
    result = gim_fast.explain_answer(model, prompts.to(device), answer.to(device), attention_mask=mask.to(device),
                                     baseline_token_id=0, backend="triton", chunk=3)
    for i in range(2):
        real = prompts[i][mask[i].bool()]
        expected = prefix_rows(model, real.to(device), answer.to(device), baseline_token_id=0, backend="eager")
        got = result.scores[i][:, torch.cat([mask[i], torch.ones(3, dtype=torch.long)]).bool()]
        assert rel_err(got, expected) <= 1e-4, i


def test_under_no_grad_and_inference_mode():
    model = tiny_model("qwen2", torch.float64)
    expected = gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0).scores
    with torch.no_grad():
        assert torch.equal(gim_fast.explain_answer(model, PROMPT, ANSWER, baseline_token_id=0).scores, expected)
    with torch.inference_mode():
        prompt, answer = PROMPT.clone(), ANSWER.clone()  # inference tensors
        assert torch.equal(gim_fast.explain_answer(model, prompt, answer, baseline_token_id=0).scores, expected)


def test_the_memory_plan_accounts_for_the_chunk(monkeypatch):
    from gim_fast import memory

    model = tiny_model("llama")
    need = [memory.estimate_memory(model.config, 64, dtype=torch.float32, cotangents=c).total for c in (1, 2, 8)]
    assert need[0] < need[1] < need[2]
    # room for 5 cotangents without checkpointing: the automatic chunk is 5 (of 7 targets)
    room = lambda c, ckpt=False: memory.estimate_memory(model.config, 64, dtype=torch.float32, cotangents=c,  # noqa
                                                         checkpointing=ckpt, num_targets=7).total / 0.9
    monkeypatch.setattr(memory, "available_memory", lambda device: int((room(5) + room(6)) / 2))
    assert memory.plan_cotangents(model, 64, 1, backend="torch", num_targets=7, count=7) == (5, False)
    result = gim_fast.explain_answer(model, random_ids(57, seed=3), random_ids(7, seed=4), baseline_token_id=0)
    assert (result.chunk, result.checkpointing) == (5, False)
    # room for 2 without checkpointing, 3 with it: checkpointing is worth its recompute
    monkeypatch.setattr(memory, "available_memory", lambda device: int(room(3, True) + 1))
    assert memory.plan_cotangents(model, 64, 1, backend="torch", num_targets=7, count=7) == (3, True)
    # not even one cotangent: refused before anything runs, the model untouched
    monkeypatch.setattr(memory, "available_memory", lambda device: int(room(1, True) / 2))
    before = snapshot(model)
    with pytest.raises(gim_fast.InsufficientMemoryError, match="needs about"):
        gim_fast.explain_answer(model, random_ids(57, seed=3), random_ids(7, seed=4), baseline_token_id=0)
    assert_same_state(before, snapshot(model))
