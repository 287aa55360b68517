"""gim_fast.circuits tasks (IOI, greater-than, capitals, JSON Lines files) with SmolLM2's tokenizer, their metrics
by hand, the refusal of tasks a model does not do, and ``gim-fast circuit`` end to end on a tiny model."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from gim_fast.circuits.tasks import (NAMES, LogitDifference, TaskNotPerformedError, TaskPerformance,
                                     YearProbabilityMass, from_jsonl, greater_than, ioi, performance)
from gim_fast.cli import main


def test_ioi_examples(smollm2):
    model, tok = smollm2
    task = ioi(tok, 6, seed=1)
    assert len(task) == 6 and [t["kind"] for t in task.texts] == ["ABBA", "BABA"] * 3
    for text, clean, corrupt, (io, s) in zip(task.texts, task.clean, task.corrupt, task.targets.tolist()):
        a, b = text["answer"].strip(), text["corrupt_answer"].strip()
        words = text["clean"].replace(",", " ").replace(".", " ").split()
        assert words.count(a) == 1 and words.count(b) == 2 and text["clean"].endswith(" to")
        first_two = [w for w in words if w in NAMES][:2]
        assert first_two == ([a, b] if text["kind"] == "ABBA" else [b, a])
        others = [w for w in text["corrupt"].replace(",", " ").replace(".", " ").split() if w in NAMES]
        assert len(others) == len(set(others)) == 3 and not {a, b} & set(others)     # three other names
        assert clean.shape == corrupt.shape
        assert tok.decode([io]) == " " + a and tok.decode([s]) == " " + b
    assert [t["clean"] for t in ioi(tok, 6, seed=1).texts] == [t["clean"] for t in task.texts]   # deterministic


def test_smollm2_does_ioi(smollm2):
    model, tok = smollm2
    perf = performance(model, ioi(tok, 6), batch_size=8)
    assert perf.accuracy >= 0.75 and perf.clean_metric > 2 and perf.corrupt_metric < perf.clean_metric
    perf.check("ioi", "smollm2-135m")


def test_greater_than_digits(smollm2):
    model, tok = smollm2
    task = greater_than(tok, 4, seed=2)
    assert task.metric.positions == 2       # SmolLM2 writes years digit by digit
    for text, clean, corrupt, (t, u) in zip(task.texts, task.clean, task.corrupt, task.targets.tolist()):
        yy = int(text["clean"].split(" to the year")[0][-2:])
        assert (t, u) == (yy // 10, yy % 10) and "01 to the year" in text["corrupt"]
        assert tok.decode(clean[-3:]) == text["clean"][-2:] + str(t)     # "...year 17" + the tens digit
        assert tok.decode(corrupt[-1:]) == "0" and clean.shape == corrupt.shape


def _mass_by_hand(probs_tens, probs_units, t, u):
    good = sum(probs_tens[d] for d in range(10) if d > t) + probs_tens[t] * sum(probs_units[d] for d in range(u + 1, 10))
    bad = sum(probs_tens[d] for d in range(10) if d < t) + probs_tens[t] * sum(probs_units[d] for d in range(u + 1))
    return good - bad


def test_year_probability_mass_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    digits = torch.arange(20, 30)
    targets = torch.tensor([[3, 2], [0, 0], [9, 9]])
    got = YearProbabilityMass(digits)(logits, targets)
    p = logits.softmax(-1)[..., 20:30]
    for b, (t, u) in enumerate(targets.tolist()):
        assert got[b].item() == pytest.approx(float(_mass_by_hand(p[b, 0], p[b, 1], t, u)))
    # two-digit year tokens: one position
    logits = torch.randn(2, 1, 150, generator=g, dtype=torch.float64)
    got = YearProbabilityMass(torch.arange(100) + 50)(logits, torch.tensor([[31], [98]]))
    p = logits.softmax(-1)[:, 0, 50:150]
    assert got.tolist() == pytest.approx([float(p[0, 32:].sum() - p[0, :32].sum()), float(p[1, 99:].sum() - p[1, :99].sum())])


def test_logit_difference():
    logits = torch.tensor([[[1.0, 5.0, 2.0]]])
    assert LogitDifference()(logits, torch.tensor([[1, 2]])).tolist() == [3.0]


def test_capitals_pairs(smollm2):
    pytest.importorskip("country_capitals")
    from gim_fast.circuits.tasks import capitals

    model, tok = smollm2
    task = capitals(model, tok, 2)
    assert len(task) == 2
    for text, clean, corrupt, (a, b) in zip(task.texts, task.clean, task.corrupt, task.targets.tolist()):
        assert text["clean"].startswith("The capital of ") and text["clean"] != text["corrupt"]
        assert clean.shape == corrupt.shape and a != b
    assert performance(model, task).accuracy == 1.0      # only countries the model knows


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_tasks_and_their_errors(smollm2, tmp_path):
    _, tok = smollm2
    ok = {"clean": "The capital of France is", "corrupt": "The capital of Spain is", "answer": " Paris",
          "corrupt_answer": " Madrid"}
    task = from_jsonl(_write(tmp_path / "ok.jsonl", [ok, ok]), tok)
    assert len(task) == 2 and task.targets[0].tolist() == [tok.encode(" Paris")[0], tok.encode(" Madrid")[0]]
    cases = [
        ({**ok, "corrupt": "The capital of the United Kingdom is"}, "tokenize to 5 and 7 tokens"),
        ({**ok, "answer": " Paris is"}, "answer ' Paris is' is not one token"),
        ({**ok, "corrupt_answer": " Paris"}, "the same token"),
        ({k: v for k, v in ok.items() if k != "corrupt"}, "non-empty strings clean, corrupt"),
        ("{not json", "not JSON"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            from_jsonl(_write(tmp_path / "bad.jsonl", [ok, row]), tok)
        assert "bad.jsonl:2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such task file"):
        from_jsonl(tmp_path / "missing.jsonl", tok)


def test_a_task_the_model_does_not_do_is_refused():
    perf = TaskPerformance(n=10, accuracy=0.4, clean_metric=-0.1, corrupt_metric=0.2, corrupt_accuracy=0.5)
    with pytest.raises(TaskNotPerformedError, match="tiny does not perform ioi: clean accuracy 40%"):
        perf.check("ioi", "tiny")
    perf.check("ioi", "tiny", min_accuracy=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face model directory."""
    import transformers as tf

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["circuit", "--task", "ioi", "--model", str(tiny_dir), "--n", "4", "--batch-size", "2", "--quiet",
            "--percentages", "1", "10", "100", "--out", str(out)]
    assert main(args) == 2
    assert "does not perform ioi" in capsys.readouterr().err          # a random model cannot do IOI
    methods = ("gim", "eap-ig", "random")
    assert main(args + ["--min-accuracy", "0", "--exact-edges", "5", "--ranking", "both",
                        "--methods", ",".join(methods), "--ig-steps", "2"]) == 0
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(r["method"], r["level"], r["ranking"]) for r in summary] == [
        (m, lvl, r) for m in methods for lvl in ("edge", "node") for r in ("signed", "absolute")]
    assert {"method", "level", "cpr", "cmd", "seconds", "peak_mb", "spearman_exact"} <= set(summary[0])
    with open(out / "curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 3 * 2 * 2 * 3
    assert all(float(r["faithfulness"]) == 1.0 for r in curve if r["percent"] == "100.0")
    import pyarrow.parquet as pq

    edges = pq.read_table(out / "edges.parquet").to_pydict()
    from gim_fast.circuits import Graph

    assert edges["edge"] == Graph(2, 6, 2).edge_names()
    assert {"edge", "src", "dst", "score_gim", "score_eap-ig", "score_random"} <= set(edges)
    assert (out / "faithfulness.png").stat().st_size > 1000 and (out / "exact.csv").exists()
    assert json.loads((out / "run.json").read_text())["examples"] == 4


@pytest.mark.parametrize("extra,message", [
    (["--task", "nonsense"], "unknown task 'nonsense'"),
    (["--task", "missing.jsonl"], "no such task file"),
    (["--task", "ioi", "--methods", "gim,exact"], "'exact' is not one of gim, eap, eap-ig, random"),
    (["--task", "ioi", "--percentages", "0"], "number > 0"),
    (["--task", "ioi", "--model", "no-such-model"], "unknown model"),
    (["--task", "ioi", "--out", "{tmp}/afile/x"], "is a file, not a directory"),
])
def test_cli_usage_errors(tiny_dir, tmp_path, capsys, monkeypatch, extra, message):
    """Each refused before the model loads."""
    import gim_fast.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(gim_fast.models, "load_pretrained", no_load)
    (tmp_path / "afile").write_text("")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["circuit", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--quiet", *extra]
    try:
        code = main(args)
    except SystemExit as e:   # argparse rejects bad option values itself
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
