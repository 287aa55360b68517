"""Whole answers from the command line: ``gim-fast explain TEXT --answer/--generate`` and ``gim-fast attribute
--answer-field/--generate`` (the matrix column, the answer columns, resume, refusals), on a tiny saved model."""
import json

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.cli import main

from jobs_support import run_cli, save_tiny, table_rows, write_jsonl

ROWS = [{"id": "a", "text": "hello there", "answer": " general"},
        {"id": "b", "text": "abc", "answer": "xyz!"},
        {"id": "c", "text": "a much longer prompt, to pad", "answer": "ok"},
        {"id": "d", "text": "no answer"},
        {"id": "e", "text": "blank answer", "answer": "  "}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("answers") / "tiny", family="mistral")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from gim_fast.models import load_pretrained

    return load_pretrained(tiny_dir)


def _code(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explain_answer_prints_each_answer_token_with_its_top_sources(tiny_dir, tiny, tmp_path, capsys):
    model, tok = tiny
    page = tmp_path / "a.html"
    code, out, _ = _code(["explain", "hello", "--model", tiny_dir, "--answer", " you", "--top", "2",
                          "--color", "never", "--html", page], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith("prompt 5 tokens, answer 4 tokens (given): ' you'")
    rows = [line for line in lines if "←" in line and line[:1].isdigit()]
    assert len(rows) == 4
    expected = gim_fast.explain_answer(model, tok("hello").input_ids, tok.encode(" you", add_special_tokens=False),
                                       tokenizer=tok)
    for m, line in enumerate(rows):
        scores = expected.scores[m, :5 + m]
        top = torch.argsort(-scores, stable=True)[:2].tolist()
        assert f"{float(expected.target_logits[m]):.4g}" in line
        first = line.split("←")[1].split(", ")[0]                   # the highest-scored source token
        assert (f"({top[0]})" if top[0] < 5 else f"(answer {top[0] - 5})") in first
        assert f"{float(scores[top[0]]):+.3g}" in first
    assert page.is_file() and page.read_text().count('class="ans a') == 4

    code, out, _ = _code(["explain", "hello", "--model", tiny_dir, "--generate", "3", "--answer-target", "logprob"],
                         capsys)
    assert code == 0 and "answer 3 tokens (generated, greedy, at most 3 tokens)" in out and "logprob" in out


@pytest.mark.parametrize("extra,message", [
    (["--answer", " a", "--target", "b"], "give one or the other"),
    (["--answer", "  "], "--answer is empty"),
    (["--answer", "a", "--generate", "2"], "not allowed with argument"),
    (["--generate", "0"], "expected an integer >= 1"),
])
def test_explain_answer_usage_errors(tiny_dir, capsys, extra, message):
    code, _, err = _code(["explain", "hello", "--model", tiny_dir, *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_attribute_answers_matrix_column(tiny_dir, tiny, tmp_path, capsys):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    code, printed, _ = _code(["attribute", "--data", data, "--out", out, "--model", tiny_dir, "--id-field", "id",
                              "--answer-field", "answer", "--answer-target", "logprob", "--html-report", "2",
                              "--no-progress"], capsys)
    assert code == 0 and "complete: 3 of 5 input rows" in printed
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [("d", "missing answer field 'answer'"),
                                                       ("e", "empty answer (field 'answer')")]
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((out / "data").glob("*.parquet")))
    assert str(schema.field("scores").type) == "list<element: list<element: float>>"
    for name in ("answer", "answer_ids", "answer_tokens", "answer_given", "answer_logits", "answer_logprobs"):
        assert name in schema.names, name
    for r in table_rows(out):
        want = next(x for x in ROWS if x["id"] == r["id"])
        ids, answer = tok(want["text"]).input_ids, tok.encode(want["answer"], add_special_tokens=False)
        assert r["token_ids"] == ids and r["answer_ids"] == answer and r["answer"] == want["answer"]
        assert r["answer_given"] and r["answer_tokens"] == [tok.decode([t]) for t in answer]
        alone = gim_fast.explain_answer(model, ids, answer, tokenizer=tok, target="logprob")
        assert np.array(r["scores"]).shape == (len(answer), len(ids) + len(answer))   # [M, P + M]
        np.testing.assert_allclose(r["scores"], alone.scores.numpy(), rtol=1e-4, atol=1e-6)   # batched vs alone
        np.testing.assert_allclose(r["answer_logprobs"], alone.target_logprobs.numpy(), rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["answer_field"] == "answer" and manifest["config"]["answer_target"] == "logprob"
    report = (out / "report.html").read_text()
    assert report.count('class="ans a') == len(" general") + len("xyz!")        # rows 1 and 2, char tokens
    # another answer setting against the same OUT is refused
    code, _, err = _code(["attribute", "--data", data, "--out", out, "--model", tiny_dir, "--id-field", "id",
                          "--answer-field", "answer", "--no-progress"], capsys)
    assert code == 2 and "answer_target: 'logprob' → 'logit'" in err


def test_attribute_generated_answers_resume_after_a_kill(tiny_dir, tiny, tmp_path, capsys):
    model, tok = tiny
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ("one", "second row", "3rd", "the fourth")])
    argv = ["attribute", "--data", data, "--model", tiny_dir, "--generate", "3", "--batch-size", "1",
            "--shard-rows", "1", "--no-progress"]
    # killed (SIGKILL) in a process of its own after two batches were written; resumed and run whole in this one
    killed = run_cli([*argv, "--out", tmp_path / "out"], env={"GIM_FAST_JOB_CRASH": "batch:3", "OMP_NUM_THREADS": "1"})
    assert killed.returncode != 0 and len(list((tmp_path / "out" / "data").glob("*.parquet"))) == 2
    code, printed, _ = _code([*argv, "--out", tmp_path / "out"], capsys)
    assert code == 0 and "2 batches were already done" in printed
    assert _code([*argv, "--out", tmp_path / "whole"], capsys)[0] == 0
    got, ref = table_rows(tmp_path / "out"), table_rows(tmp_path / "whole")
    assert [r["line"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        assert a["answer_ids"] == b["answer_ids"] and not a["answer_given"]
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)
        generated = model.generate(torch.tensor([a["token_ids"]]), max_new_tokens=3, do_sample=False,
                                   pad_token_id=0)[0, len(a["token_ids"]):].tolist()
        eos = model.generation_config.eos_token_id
        assert a["answer_ids"] == (generated[:generated.index(eos)] if eos in generated else generated)


@pytest.mark.parametrize("extra,message", [
    (["--answer-field", "answer", "--generate", "2"], "not allowed with argument"),
    (["--answer-field", "answer", "--target-field", "answer"], "give one or the other"),
    (["--answer-target", "logprob"], "answer_target applies to answers"),
    (["--answer-field", "nope"], "no column 'nope'"),
])
def test_attribute_answer_usage_errors(tiny_dir, tmp_path, capsys, extra, message):
    data = tmp_path / "in.csv"
    data.write_text("text,answer\nhello,there\n")
    code, _, err = _code(["attribute", "--data", data, "--out", tmp_path / "out", "--model", tiny_dir,
                          "--no-progress", *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err
