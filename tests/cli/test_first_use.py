"""What a new user met on first use of the command line (issue 22, defects 1, 2, 5, 7, 8, 9): each test fails on the
code before the fix.

1. ``evaluate`` wrote into bench/results (overwriting committed results) by default;
2. ``circuit --n 1000000`` hung while generating the task;
5. a mistyped JSON Lines field ran the whole job with every row an error;
7. a task or data file that is not UTF-8 failed after the model loaded, without naming the file or the line;
8. ``circuit`` wrote tqdm's control codes into logs;
9. list options had two conventions, and argparse took ``--shard`` for ``--shard-rows``; texts: "a apple", the
   answer job's token count, a repeated error.
"""
import json
import re
import time

import pytest

import gim_fast.models
from gim_fast.cli import build_parser

from cli_support import refused, run_main as _run
from jobs_support import save_tiny, write_jsonl


def _refused(argv, *messages):
    err = refused(argv, *messages)
    assert len(err.strip().splitlines()) == 1 or "usage:" in err, err
    return err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("first_use") / "tiny")


# ------------------------------------------------------------------------------------------------- 1. evaluate


def test_evaluate_writes_a_new_folder_by_default_and_refuses_a_non_empty_one(tiny_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello wor"}, {"text": "abc"}])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    base = ["evaluate", "--models", tiny_dir, "--data", data, "--methods", "gim", "random", "--temperatures",
            "none", "--quiet"]
    code, out, err = _run(base)
    assert code == 0, err
    assert not (work / "bench").exists()                       # never the committed results' folder
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"evaluate-faithfulness-\d{8}-\d{6}", runs[0].name)
    assert (runs[0] / "summary.csv").is_file() and str(runs[0].name) in out

    gim_fast_models_load = gim_fast.models.load_pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")
    monkeypatch.setattr(gim_fast.models, "load_pretrained", refuse)
    before = {p.name: p.read_bytes() for p in runs[0].iterdir()}
    err = _refused([*base, "--out", runs[0]], "the folder is not empty", "summary.csv", "--overwrite")
    assert {p.name: p.read_bytes() for p in runs[0].iterdir()} == before      # nothing touched
    _refused(["evaluate", "--task", "context", "--models", tiny_dir, "--out", runs[0], "--quiet"],
             "the folder is not empty")
    monkeypatch.setattr(gim_fast.models, "load_pretrained", gim_fast_models_load)
    code, _, err = _run([*base, "--out", runs[0], "--overwrite"])
    assert code == 0, err
    assert "--overwrite" in (runs[0] / "faithfulness.md").read_text()      # the recorded command reproduces it


def test_circuit_refuses_a_non_empty_output_folder(no_loading, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.csv").write_text("earlier results\n")
    _refused(["circuit", "--task", "ioi", "--out", out], "the folder is not empty", "--overwrite")


# ------------------------------------------------------------------------------------------------- 2. circuit size


def test_circuit_with_a_huge_n_is_refused_at_once(no_loading, tmp_path):
    started = time.perf_counter()
    _refused(["circuit", "--task", "ioi", "--n", "1000000", "--methods", "random", "--levels", "node", "--out",
              tmp_path / "c4"], "--n 1000000", "at most 10,000 examples")
    assert time.perf_counter() - started < 5 and not (tmp_path / "c4").exists()


# ------------------------------------------------------------------------------------------------- 5. fields


@pytest.mark.parametrize("option", ["--answer-field", "--text-field", "--target-field", "--id-field"])
def test_a_mistyped_jsonl_field_is_refused_before_loading(no_loading, tmp_path, option):
    data = write_jsonl(tmp_path / "d20.jsonl", [{"text": f"row {i}", "answer": " yes", "target": " x", "id": i}
                                                for i in range(20)])
    _refused(["attribute", "--data", data, "--out", tmp_path / "x7", option, "nosuchfield"],
             "has the field 'nosuchfield'", f"given as {option}", "'text', 'answer', 'target', 'id'")
    assert not (tmp_path / "x7").exists()


def test_jsonl_rows_with_the_fields_still_run(tiny_dir, tmp_path):
    """A field that some of the first rows lack is not a typo: those rows are the bad ones, as before."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "cd", "answer": "e"}, "a bare string"])
    code, out, err = _run(["attribute", "--data", data, "--out", tmp_path / "x", "--model", tiny_dir,
                           "--answer-field", "answer", "--no-progress"])
    assert code == 0, err
    assert "2 bad rows" in out and "missing answer field 'answer'" in out 


# ------------------------------------------------------------------------------------------------- 7. UTF-8


def _latin1(path, rows):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("latin-1"))
    return path


def test_a_task_or_data_file_that_is_not_utf8_is_named_with_its_line(no_loading, tmp_path):
    row = {"clean": "ab", "corrupt": "cd", "answer": "x", "corrupt_answer": "y"}
    task = _latin1(tmp_path / "latin1.jsonl", [row, {**row, "clean": "caf\u00e9"}])
    _refused(["circuit", "--task", task, "--out", tmp_path / "c"], f"{task}: line 2, column 15", "byte 0xe9",
             "save the file as UTF-8")
    data = _latin1(tmp_path / "latin1-data.jsonl", [{"text": "ok"}, {"text": "caf\u00e9"}])
    _refused(["evaluate", "--data", data, "--out", tmp_path / "e", "--methods", "gim"], f"{data}: line 2",
             "byte 0xe9")
    _refused(["attribute", "--data", data, "--out", tmp_path / "a"], f"{data}: line 2", "byte 0xe9")


# ------------------------------------------------------------------------------------------------- 8. progress


def test_circuit_progress_in_a_log_is_plain_lines(tiny_dir, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [{"clean": "ab", "corrupt": "cd", "answer": "x",
                                                  "corrupt_answer": "y"}, {"clean": "ef", "corrupt": "gh",
                                                                           "answer": "z", "corrupt_answer": "w"}])
    code, _, err = _run(["circuit", "--task", task, "--model", tiny_dir, "--out", tmp_path / "c", "--methods",
                         "gim", "random", "--levels", "edge", "--percentages", "10", "100", "--min-accuracy", "0"])
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err                       # no bar redraws, no escape codes
    assert "gim-fast circuit: scoring: gim: 2/2 (100%)" in err and "gim-fast circuit: circuit runs:" in err


# ------------------------------------------------------------------------------------------------- 9. conventions


def test_list_options_take_spaces_and_commas_everywhere():
    parser = build_parser()
    for spelled in (["gim", "eap"], ["gim,eap"], ["gim,", "eap"]):
        assert parser.parse_args(["circuit", "--task", "ioi", "--out", "x", "--methods", *spelled]).methods == \
            ["gim", "eap"]
        assert parser.parse_args(["evaluate", "--methods", *spelled]).methods == ["gim", "eap"]
    args = parser.parse_args(["circuit", "--task", "ioi", "--out", "x", "--levels", "node", "--percentages",
                              "1,10", "100"])
    assert args.levels == ["node"] and args.percentages == [1.0, 10.0, 100.0]
    args = parser.parse_args(["evaluate", "--models", "a,b", "c", "--documents", "10,30", "--temperatures", "1,2"])
    assert args.models == ["a", "b", "c"] and args.documents == [10, 30] and args.temperatures == [1.0, 2.0]
    assert parser.parse_args(["evaluate", "--temperatures"]).temperatures == []


@pytest.mark.parametrize("argv", [
    ["attribute", "--data", "d.jsonl", "--out", "x", "--batch-tok", "100"],      # --batch-tokens
    ["attribute", "--data", "d.jsonl", "--out", "x", "--shard-r", "5"],          # --shard-rows (--shard is its own)
    ["explain", "hi", "--tar", " Paris"],                                         # --target
    ["evaluate", "--meth", "gim"],                                                # --methods
    ["circuit", "--task", "ioi", "--out", "x", "--meth", "gim"],                  # --methods
])
def test_options_are_never_abbreviated(argv):
    code, _, err = _run(argv)
    assert code == 2 and "unrecognized arguments" in err, err


def test_ioi_prompts_use_the_right_article(smollm2):
    from gim_fast.circuits import tasks

    _, tok = smollm2
    task = tasks.ioi(tok, n=200, seed=3)
    texts = [t[k] for t in task.texts for k in ("clean", "corrupt")]
    assert any(" an apple " in t for t in texts)
    assert not [t for t in texts if re.search(r"\ba [aeiou]", t)]


def test_answer_job_counts_the_same_tokens_in_summary_and_manifest(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc", "answer": "de"}, {"text": "fghi", "answer": "j"}])
    code, out, err = _run(["attribute", "--data", data, "--out", tmp_path / "x", "--model", tiny_dir,
                           "--answer-field", "answer", "--no-progress"])
    assert code == 0, err
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["counts"]["tokens"] == 3 + 2 + 4 + 1
    assert "(10 tokens," in out


def test_the_empty_answer_error_says_it_once(smollm2):
    import gim_fast

    model, tok = smollm2
    with pytest.raises(ValueError) as e:
        gim_fast.explain_answer(model, tok("Hi", return_tensors="pt").input_ids[0], [], tokenizer=tok)
    assert str(e.value) == "answer_ids is empty: an answer needs at least one token"
