"""Chat prompts (``--chat``, ``chat=True``), input from standard input or a file, and long inputs (issue 22, items 4,
11, 12).

The references are independent of the chat code: the same prompt tokenized by hand from the template's text, its
attribution by ``gim_fast.explain``/``explain_answer`` without ``chat``, and the message's characters located with
``str.find``.
"""
import re

import pytest
import torch

import gim_fast
from gim_fast.chat import chat_prompt, special_mask, special_token_ids

from cli_support import run_main as _run
from jobs_support import char_tokenizer, save_tiny

CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>[bot] {% endif %}")
MESSAGE = "Where is Lima?"


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny Llama whose character tokenizer has a chat template, saved as a model directory."""
    folder = save_tiny(tmp_path_factory.mktemp("chat") / "tiny")
    tok = char_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("plain") / "tiny")


def _chat_ids(tok):
    """The chat prompt's ids and the message's token positions, found without gim_fast.chat."""
    text = f"<s>[user] {MESSAGE}</s><s>[bot] "
    assert tok.apply_chat_template([{"role": "user", "content": MESSAGE}], tokenize=False,
                                   add_generation_prompt=True) == text
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.find(MESSAGE)
    message = [start <= a < start + len(MESSAGE) for a, _ in enc.offset_mapping]
    return torch.tensor(enc.input_ids), message


def test_special_token_ids_include_added_special_tokens():
    tok = char_tokenizer()
    tok.add_tokens(["<start_of_turn>"], special_tokens=True)       # special in added_tokens_decoder only
    tok.add_tokens(["<plain_added>"], special_tokens=False)
    turn, plain = tok.convert_tokens_to_ids(["<start_of_turn>", "<plain_added>"])
    assert turn not in tok.all_special_ids                           # what the old code looked at
    assert turn in special_token_ids(tok) and plain not in special_token_ids(tok)
    assert special_mask(tok, [turn, 5, plain]) == [True, False, False]


def test_gemma_chat_markup_is_special(smollm2):
    """Gemma-3-270M's <start_of_turn> (id 105) and <end_of_turn> (106) are special in every view."""
    from gim_fast.models import load_pretrained

    try:
        _, tok = load_pretrained("gemma3-270m")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert {105, 106} <= special_token_ids(tok)
    assert tok.decode([105]) == "<start_of_turn>" and 105 not in tok.all_special_ids
    _, smol = smollm2
    assert smol.convert_tokens_to_ids("<|im_start|>") in special_token_ids(smol)


def test_chat_prompt_marks_the_message_tokens(chat_dir):
    tok = char_tokenizer()
    tok.chat_template = CHAT
    ids, message = _chat_ids(tok)
    prompt = chat_prompt(tok, MESSAGE)
    assert prompt.input_ids == ids.tolist() and prompt.template == [not m for m in message]
    assert prompt.message_tokens == len(MESSAGE)


def test_explain_answer_chat_scores_the_message_only(chat_dir):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(chat_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float64).eval()
    ids, message = _chat_ids(tok)
    answer = torch.tensor(tok("Peru", add_special_tokens=False).input_ids)
    got = gim_fast.explain_answer(model, MESSAGE, answer, tokenizer=tok, chat=True)
    plain = gim_fast.explain_answer(model, ids, answer, tokenizer=tok)
    keep = torch.tensor(message + [True] * len(answer))
    torch.testing.assert_close(got.scores, torch.where(keep, plain.scores, torch.zeros_like(plain.scores)),
                               rtol=0, atol=0)
    assert got.template_mask.tolist() == (~keep).tolist()
    assert (plain.scores[:, ~keep] != 0).any()                     # the template's tokens did have scores
    with pytest.raises(TypeError, match="the user's message as a string"):
        gim_fast.explain_answer(model, ids, answer, tokenizer=tok, chat=True)
    with pytest.raises(ValueError, match="has no chat template"):
        gim_fast.explain_answer(model, MESSAGE, answer, tokenizer=char_tokenizer(), chat=True)


def test_explain_generation_chat(chat_dir):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(chat_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(chat_dir).eval()
    model.generation_config.eos_token_id = 3
    ids, message = _chat_ids(tok)
    got = gim_fast.explain_generation(model, tok, MESSAGE, max_new_tokens=3, chat=True)
    assert got.prompt_length == len(ids) and got.template_mask[:len(ids)].tolist() == [not m for m in message]
    again = gim_fast.explain_answer(model, ids, got.target_ids, tokenizer=tok)
    torch.testing.assert_close(got.scores[:, :len(ids)][:, torch.tensor(message)],
                               again.scores[:, :len(ids)][:, torch.tensor(message)])


def test_cli_explain_chat(chat_dir, plain_dir):
    code, out, err = _run(["explain", MESSAGE, "--chat", "--model", chat_dir, "--color", "never"])
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if re.match(r"\s*\d+  ", ln)]
    tok = char_tokenizer()
    tok.chat_template = CHAT
    ids, message = _chat_ids(tok)
    assert len(lines) == len(ids)
    for line, is_message in zip(lines, message):
        assert line.endswith("(special)") != is_message, line      # the template's tokens: special, score 0
        if not is_message:
            assert re.search(r"\s[+-]?0\s+\(special\)$", line), line
    assert f"chat: the message is {len(MESSAGE)} tokens of the chat template's {len(ids)} tokens" in out
    code, _, err = _run(["explain", MESSAGE, "--chat", "--model", plain_dir])
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1


def test_cli_explain_reads_stdin_and_a_file(plain_dir, tmp_path):
    text = "Lima is in Peru."
    _, expected, _ = _run(["explain", text, "--model", plain_dir, "--color", "never"])
    code, out, err = _run(["explain", "-", "--model", plain_dir, "--color", "never"], stdin=text + "\n")
    assert code == 0 and out == expected, err
    path = tmp_path / "prompt.txt"
    path.write_text(text + "\n", encoding="utf-8")
    code, out, err = _run(["explain", "--text-file", path, "--model", plain_dir, "--color", "never"])
    assert code == 0 and out == expected, err
    for argv, message in ((["explain", text, "--text-file", path], "not two of them"),
                          (["explain"], "no text to explain"),
                          (["explain", "--text-file", tmp_path / "missing.txt"], "no such file")):
        code, _, err = _run([*argv, "--model", plain_dir])
        assert code == 2 and message in err, err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    code, _, err = _run(["explain", "--text-file", latin, "--model", plain_dir])
    assert code == 2 and f"{latin}: line 1, column 4" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = _run(["explain", "--text-file", empty, "--model", plain_dir])
    assert code == 2 and "is empty" in err


def test_cli_explain_long_input_prints_the_top_tokens_and_a_summary(plain_dir, tmp_path):
    import transformers as tf

    text = ("Lima is the capital of Peru and Oslo is the capital of Norway. " * 4)[:250]
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    code, out, err = _run(["explain", "--text-file", path, "--model", plain_dir, "--color", "never"])
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if re.match(r"\s*\d+  ", ln)]
    assert len(lines) == 30 and "250 tokens: sum" in out and "--all-tokens prints every token" in out
    model = tf.AutoModelForCausalLM.from_pretrained(plain_dir).eval()
    tok = tf.AutoTokenizer.from_pretrained(plain_dir)
    ids = tok(text, return_tensors="pt").input_ids[0]
    scores = gim_fast.explain(model, ids, tokenizer=tok)
    top = sorted(torch.argsort(-scores.abs(), stable=True)[:30].tolist())
    assert [int(ln.split()[0]) for ln in lines] == top                       # the 30 largest |score|, in order
    code, out, _ = _run(["explain", "--text-file", path, "--model", plain_dir, "--color", "never", "--all-tokens"])
    assert code == 0 and len([ln for ln in out.splitlines() if re.match(r"\s*\d+  ", ln)]) == 250


@pytest.mark.parametrize("answers", [False, True], ids=["next-token", "answers"])
def test_cli_attribute_chat(chat_dir, plain_dir, tmp_path, answers):
    import transformers as tf

    from jobs_support import table_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": MESSAGE, "answer": "Peru"}, {"text": "Hi"}])
    extra = ["--answer-field", "answer"] if answers else []
    out = tmp_path / "run"
    code, _, err = _run(["attribute", "--data", data, "--out", out, "--model", chat_dir, "--chat", "--no-progress",
                         "--html-report", "2", *extra])
    assert code == 0, err
    row = next(r for r in table_rows(out) if r["text"] == MESSAGE)
    tok = tf.AutoTokenizer.from_pretrained(chat_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(chat_dir).eval()
    ids, message = _chat_ids(tok)
    assert row["token_ids"] == ids.tolist() and row["template"] == [not m for m in message]
    if answers:
        answer = torch.tensor(row["answer_ids"])
        expected = gim_fast.explain_answer(model, ids, answer, tokenizer=tok).scores[:, :len(ids)]
        got = torch.tensor(row["scores"])[:, :len(ids)]
    else:
        expected = gim_fast.explain(model, ids, tokenizer=tok)[None]
        got = torch.tensor(row["scores"])[None]
    keep = torch.tensor(message)
    torch.testing.assert_close(got[:, keep], expected[:, keep], rtol=1e-4, atol=1e-5)
    assert (got[:, ~keep] == 0).all()
    page = (out / "report.html").read_text()
    assert page.count("special") >= sum(not m for m in message)
    code, _, err = _run(["attribute", "--data", data, "--out", tmp_path / "plain", "--model", plain_dir, "--chat"])
    assert code == 2 and "has no chat template" in err
