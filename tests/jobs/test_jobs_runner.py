"""attribute_dataset on tiny models: batched = one-row results, every format, output files, bad rows, refusals."""
import json

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.jobs import BadRowError, JobError, read_results
from gim_fast.models import load_pretrained

from jobs_support import save_tiny, table_rows, write_jsonl

TEXTS = ["The capital of France is", "abc", "Water boils at", "a", "hello world, hello", "zz top",
         "The capital of Spain is", "x y z", "tokens of many lengths here", "q"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_pretrained(tiny_dir)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_results_equal_one_row_explain(family, tmp_path):
    model, tok = load_pretrained(save_tiny(tmp_path / family, family))
    records = [{"text": t, "target": (" " if i % 3 == 0 else None)} if i % 2 else {"text": t, "target": 7}
               for i, t in enumerate(TEXTS)]
    run = gim_fast.attribute_dataset(records, model, tokenizer=tok, target_field="target", batch_tokens=60)
    results = list(run)
    assert len(results) == len(TEXTS) and not run.errors
    assert max(len(b.rows) for b in run.plan) > 1                # really batched, with padding
    assert any(len({len(r.token_ids) for r in b.rows}) > 1 for b in run.plan)
    for r in results:
        ids = torch.tensor(tok(TEXTS[r.line - 1]).input_ids)
        given = records[r.line - 1]["target"]
        alone = gim_fast.explain(model, ids, tokenizer=tok,
                                 target_token_id=None if given is None else r.target_id)
        assert r.token_ids == ids.tolist() and r.scores.dtype == np.float32
        np.testing.assert_allclose(r.scores, alone.numpy(), rtol=1e-4, atol=1e-6)
        assert r.target_given == (given is not None) and r.target_position == len(ids) - 1
        assert r.tokens == [tok.decode([i]) for i in ids.tolist()] and r.target == tok.decode([r.target_id])
        if given is None:
            with torch.no_grad():
                logits = model(ids[None]).logits[0, -1]
            assert r.target_id == int(logits.argmax())
            assert r.target_logit == pytest.approx(float(logits.max()), abs=1e-5)


def test_output_directory(tiny_dir, tmp_path):
    import pyarrow.parquet as pq

    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
                       + [{"id": "bad", "text": ""}])
    out = tmp_path / "out"
    run = gim_fast.attribute_dataset(data, str(tiny_dir), out=out, id_field="id", batch_tokens=40, shard_rows=3,
                                     html_report=4)
    yielded = {r.line: r for r in run}
    summary, manifest = run.summary, run.manifest
    assert summary["rows"] == len(TEXTS) and summary["errors"] == 1 and summary["complete"]
    shards = sorted((out / "data").glob("part-*.parquet"))
    assert len(shards) > 1 and not list(out.rglob(".*.tmp-*"))
    schema = pq.read_schema(shards[0])
    assert schema.names == ["id", "line", "text", "token_ids", "tokens", "scores", "target_id", "target",
                            "target_logit", "target_position", "target_given"]
    assert str(schema.field("scores").type) == "list<element: float>"          # float32
    assert str(schema.field("token_ids").type) == "list<element: int32>"
    assert str(schema.field("tokens").type) == "list<element: string>"
    rows = table_rows(out)
    assert [r["line"] for r in rows] == list(range(1, len(TEXTS) + 1))
    for r in rows:
        y = yielded[r["line"]]
        assert r["id"] == f"r{r['line'] - 1}" and r["text"] == TEXTS[r["line"] - 1]
        assert r["token_ids"] == y.token_ids and r["tokens"] == y.tokens and r["target_id"] == y.target_id
        assert np.array_equal(np.array(r["scores"], np.float32), y.scores)
        assert r["target_position"] == len(r["token_ids"]) - 1 and r["target_given"] is False
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["model"] == str(tiny_dir)
    cfg = manifest["config"]
    assert (cfg["softmax_temperature"], cfg["q_scale"], cfg["k_scale"], cfg["v_scale"], cfg["gate_scale"],
            cfg["up_scale"], cfg["freeze_norm"], cfg["backend"]) == (2.0, 0.25, 0.25, 0.5, 0.5, 0.5, True, "auto")
    assert cfg["batch_tokens"] == 40 and cfg["max_length"] == 256 and len(cfg["input_sha256"]) == 64
    assert set(manifest["versions"]) >= {"gim-fast", "torch", "transformers", "pyarrow", "python"}
    counts = manifest["counts"]
    assert (counts["input_rows"], counts["rows"], counts["errors"], counts["shards"]) == \
        (len(TEXTS) + 1, len(TEXTS), 1, len(shards))
    assert counts["tokens"] == sum(len(r["token_ids"]) for r in rows)
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"line": len(TEXTS) + 1, "id": "bad", "reason": "empty text", "text": ""}]
    report = (out / "report.html").read_text()
    assert report.count('<section class="row">') == 4 and "id r3 (line 4)" in report and "line 5" not in report

    # the same command again: nothing to do, nothing changes
    again = gim_fast.attribute_dataset(data, str(tiny_dir), out=out, id_field="id", batch_tokens=40, shard_rows=3)
    assert list(again) == [] and again.summary["already_done_batches"] == len(run.plan)
    assert table_rows(out) == rows


def test_every_input_format_gives_the_same_results(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, tok = tiny
    targets = [None, "a", None, "b", 5, None, "c", None, None, "d"]
    files = {
        "jsonl": write_jsonl(tmp_path / "in.jsonl", [{"text": t, "target": g} for t, g in zip(TEXTS, targets)]),
        "parquet": tmp_path / "in.parquet",
        "csv": tmp_path / "in.csv",
        "tsv": tmp_path / "in.tsv",
    }
    pq.write_table(pa.table({"text": TEXTS, "target": [None if g is None else str(g) for g in targets]}),
                   files["parquet"])
    import csv

    for kind, sep in (("csv", ","), ("tsv", "\t")):
        with open(files[kind], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["text", "target"])
            w.writerows([t, "" if g is None else g] for t, g in zip(TEXTS, targets))
    results = {}
    for kind, path in files.items():
        run = gim_fast.attribute_dataset(path, model, tokenizer=tok, target_field="target", batch_tokens=50)
        results[kind] = sorted(((r.text, r.target_id, r.scores.tolist()) for r in run))   # CSV lines count the header
    text = tmp_path / "in.txt"
    text.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    plain = sorted((r.text, r.target_id, r.scores.tolist()) for r in gim_fast.attribute_dataset(
        text, model, tokenizer=tok, batch_tokens=50))
    reference = results.pop("jsonl")
    assert len(reference) == len(TEXTS)
    for kind, got in results.items():
        assert got == reference, kind
    # plain text has no targets, so its batches differ: equal up to rounding
    untargeted = {TEXTS[i] for i, g in enumerate(targets) if g is None}
    mine, theirs = [p for p in plain if p[0] in untargeted], [r for r in reference if r[0] in untargeted]
    assert [p[:2] for p in mine] == [r[:2] for r in theirs]
    for p, r in zip(mine, theirs):
        np.testing.assert_allclose(p[2], r[2], rtol=1e-4, atol=1e-6)


def test_bad_rows_are_reported_not_dropped(tiny, tmp_path):
    model, tok = tiny
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "fine"}\n'
                    '{"text": ""}\n'
                    'not json\n'
                    '{"text": "unknown target", "target": "two tokens"}\n'
                    '{"text": "' + "long " * 20 + '"}\n'
                    '{"text": "target id", "target": 1000}\n'
                    '{"text": "also fine", "target": "e"}\n', encoding="utf-8")
    out = tmp_path / "out"
    run = gim_fast.attribute_dataset(data, model, tokenizer=tok, out=out, target_field="target", max_length=50)
    done = [r.line for r in run]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(done) == [1, 7]
    assert [(e["line"], e["reason"].split(":")[0]) for e in errors] == [
        (2, "empty text"), (3, "malformed JSON"), (4, "unknown target token 'two tokens'"),
        (5, "too long"), (6, "target id 1000 is outside the vocabulary [0, 101)")]
    assert sorted(done + [e["line"] for e in errors]) == list(range(1, 8))       # every row exactly once
    with pytest.raises(BadRowError, match="line 2: empty text"):
        list(gim_fast.attribute_dataset(data, model, tokenizer=tok, target_field="target", strict=True))


def test_a_changed_command_is_refused(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:4]])
    out = tmp_path / "out"
    gim_fast.attribute_dataset(data, str(tiny_dir), out=out).run()
    before = sorted(p.name for p in (out / "data").iterdir())
    with pytest.raises(JobError, match=r"q_scale: 0.25 → 0.5.*choose a new --out"):
        gim_fast.attribute_dataset(data, str(tiny_dir), out=out, q_scale=0.5).run()
    with pytest.raises(JobError, match=r"softmax_temperature: 2.0 → None"):
        gim_fast.attribute_dataset(data, str(tiny_dir), out=out, softmax_temperature=None).run()
    other = save_tiny(tmp_path / "other", seed=1)
    with pytest.raises(JobError, match=r"model: .*llama.* → .*other"):
        gim_fast.attribute_dataset(data, str(other), out=out).run()
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())                 # the same bytes under another name: resumes
    assert list(gim_fast.attribute_dataset(moved, str(tiny_dir), out=out)) == []
    write_jsonl(data, [{"text": t} for t in TEXTS[:5]])
    with pytest.raises(JobError, match="other contents.*input_sha256"):
        gim_fast.attribute_dataset(data, str(tiny_dir), out=out).run()
    assert sorted(p.name for p in (out / "data").iterdir()) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="not from a gim-fast job"):
        gim_fast.attribute_dataset(data, str(tiny_dir), out=foreign).run()


def test_argument_checks(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_tokens"):
        gim_fast.attribute_dataset(["a"], model, tokenizer=tok, batch_tokens=0)
    with pytest.raises(ValueError, match="q_scale"):
        gim_fast.attribute_dataset(["a"], model, tokenizer=tok, q_scale=-1)
    with pytest.raises(ValueError, match="--format"):
        gim_fast.attribute_dataset(tmp_path / "x.dat", model, tokenizer=tok)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        list(gim_fast.attribute_dataset(["a"], model))
    assert read_results(tmp_path) is None


def test_no_good_rows_is_a_complete_empty_job(tiny, tmp_path):
    model, tok = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = gim_fast.attribute_dataset(empty, model, tokenizer=tok, out=tmp_path / "a", html_report=3)
    assert list(run) == [] and run.manifest["status"] == "complete" and run.manifest["counts"]["rows"] == 0
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    run = gim_fast.attribute_dataset(blank, model, tokenizer=tok, out=tmp_path / "b")
    assert list(run) == [] and run.manifest["counts"]["errors"] == 2 and read_results(tmp_path / "b") is None
