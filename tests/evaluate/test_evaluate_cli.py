"""The capital prompt data and ``gim-fast evaluate`` end to end on SmolLM2 (a few examples)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from gim_fast.cli import main
from gim_fast.evaluate.methods import attnlrp_unavailable


def test_countries():
    pytest.importorskip("country_capitals")
    from gim_fast.data import capital_prompts, countries

    rows = countries()
    assert len(rows) == 193 and len({r.code for r in rows}) == 193
    france = next(r for r in rows if r.code == "FRA")
    assert (france.name, france.capital, france.prompt) == ("France", "Paris", "The capital of France is")
    assert next(r for r in rows if r.code == "BOL").name == "Bolivia"          # pycountry's common name
    assert capital_prompts() == [r.prompt for r in rows]


def test_capital_examples_are_answered_right(smollm2):
    pytest.importorskip("country_capitals")
    from gim_fast.evaluate.run import capital_examples

    model, tok = smollm2
    selection = capital_examples(model, tok, 3, seed=3)
    assert len(selection.examples) == 3 and selection.correct == 3 and selection.total == 193
    for ex in selection.examples:
        assert ex.text == f"The capital of {ex.text[len('The capital of '):-len(' is')]} is"
        assert (" " + ex.answer).startswith(ex.target), (ex.answer, ex.target)
        with torch.no_grad():
            assert int(model(ex.input_ids[None]).logits[0, -1].argmax()) == ex.target_id
    again = capital_examples(model, tok, 3, seed=3)
    assert [e.key for e in again.examples] == [e.key for e in selection.examples]


def test_capital_examples_with_solved_examples_first(smollm2):
    pytest.importorskip("country_capitals")
    from gim_fast.evaluate.run import _capital_shots, capital_examples

    assert [_capital_shots(d) for d in ("capitals", "capitals-3shot", "capitals-xshot", "x.jsonl")] == [0, 3, None, None]
    model, tok = smollm2
    selection = capital_examples(model, tok, 2, seed=0, shots=2)
    for ex in selection.examples:
        assert ex.text.count("The capital of ") == 3 and ex.text.endswith(" is")
        assert ex.text.split(". ")[-1] == f"The capital of {ex.text.split('The capital of ')[-1]}"


def test_jsonl_examples_drop_wrong_targets(smollm2, tmp_path):
    from gim_fast.evaluate.run import jsonl_examples

    model, tok = smollm2
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "The capital of France is", "target": " Paris"},
        {"text": "The capital of France is", "target": " Banana"},
        {"text": "Water boils at"}]) + "\n")
    selection = jsonl_examples(path, model, tok)
    assert sorted(e.target for e in selection.examples)[-1] == " Paris"
    assert len(selection.examples) == 2 and selection.candidates == 3
    path.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="non-empty"):
        jsonl_examples(path, model, tok)


def test_evaluate_end_to_end(smollm2, tmp_path, capsys):
    pytest.importorskip("captum")
    pytest.importorskip("country_capitals")
    out = tmp_path / "faith"
    rc = main(["evaluate", "--models", "smollm2-135m", "--n", "2", "--methods", "gim", "grad_x_input",
               "integrated_gradients", "random", "attnlrp", "--temperatures", "1", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| `gim` |" in printed and "wall time" in printed
    for name in ("summary.csv", "examples.csv", "faithfulness.md", "temperature_sweep.csv", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "temperature_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "summary.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gim", "grad_x_input", "integrated_gradients", "random", "gim_t1", "gim_t2", "attnlrp"}
    assert rows["gim"]["n"] == "2"
    if attnlrp_unavailable() is None:   # the side install is there: AttnLRP runs in its worker, checked
        assert rows["attnlrp"]["n"] == "2" and float(rows["attnlrp"]["attnlrp_logit_max_rel_diff"]) <= 1e-4
        assert 0 < float(rows["attnlrp"]["attnlrp_mean_abs_conservation_gap"]) < 2 * float(
            rows["attnlrp"]["attnlrp_mean_abs_logit"])
    else:
        assert rows["attnlrp"]["n"] == "0" and "side install" in rows["attnlrp"]["unavailable"]
    assert rows["gim_t2"]["comprehensiveness"] == rows["gim"]["comprehensiveness"]
    assert float(rows["integrated_gradients"]["ig_mean_abs_completeness_gap"]) >= 0
    with (out / "examples.csv").open() as f:
        examples = list(csv.DictReader(f))
    assert len(examples) == 2 * (7 if attnlrp_unavailable() is None else 6)
    md = (out / "faithfulness.md").read_text()
    assert "gim-fast evaluate --models smollm2-135m" in md and "completeness gap" in md
    assert ("conservation gap" in md) if attnlrp_unavailable() is None else ("unavailable" in md)
    run = json.loads((out / "run.json").read_text())
    assert run["models"][0]["model"] == "smollm2-135m" and len(run["models"][0]["examples"]) == 2
    if attnlrp_unavailable() is None:
        assert run["models"][0]["checks"]["attnlrp"]["attnlrp_prompts_checked"] == 2


def test_evaluate_usage_errors(tmp_path, capsys):
    assert main(["evaluate", "--methods", "lime", "--out", str(tmp_path)]) == 2
    assert "unknown method 'lime'" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--n", "0"])
    assert e.value.code == 2


def test_evaluate_with_every_method_unavailable_fails(tmp_path, capsys, monkeypatch):
    """AttnLRP alone without its side install: refused before any model loads (exit 2, the reason named)."""
    monkeypatch.setenv("GIM_FAST_LXT", str(tmp_path / "no-side-install"))
    out = tmp_path / "out"
    assert main(["evaluate", "--models", "smollm2-135m", "--n", "1", "--methods", "attnlrp", "--temperatures",
                 "none", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "every method asked for is unavailable" in err and "no AttnLRP side install" in err
    assert not out.exists()


def test_evaluate_fails_when_no_method_computed_a_score(smollm2, tmp_path, capsys, monkeypatch):
    """A method that turns out unavailable only once the model is loaded (AttnLRP's worker refusing it): when no
    method computed anything the run writes nothing and exits 1 with each reason."""
    import dataclasses

    from gim_fast.evaluate.methods import METHODS, Method, MethodUnavailable

    class Refused(Method):
        def prepare(self, model, batches):
            raise MethodUnavailable("the worker refused this model")

    monkeypatch.setitem(METHODS, "random", Refused(**{f.name: getattr(METHODS["random"], f.name)
                                                       for f in dataclasses.fields(Method)}))
    out = tmp_path / "out"
    assert main(["evaluate", "--models", "smollm2-135m", "--n", "1", "--methods", "random", "--temperatures",
                 "none", "--out", str(out), "--quiet"]) == 1
    assert "random: unavailable: the worker refused this model" in capsys.readouterr().err
    assert not (out / "summary.csv").exists()
