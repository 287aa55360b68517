"""``gim-fast attribute`` end to end: a tiny saved model (every format, bad input, refusals, torchrun with two CPU
processes) and the real SmolLM2-135M; ``gim-fast explain --html``."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gim_fast
from gim_fast.cli import build_parser, main

from jobs_support import ROOT, run_cli, save_tiny, table_rows, write_jsonl

PROMPTS = ["The capital of France is", "The capital of Japan is", "Water boils at", "To be or not to"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli") / "tiny")


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["attribute", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())     # argparse wraps lines
    for option in ("--data", "--out", "--model", "--format", "--text-field", "--target-field", "--target-type",
                   "--id-field", "--html-report", "--strict", "--dtype", "--device", "--cache-dir", "--temperature",
                   "--q-scale", "--k-scale", "--v-scale", "--gate-scale", "--up-scale", "--no-freeze-norm",
                   "--backend", "--baseline", "--batch-tokens", "--batch-size", "--max-length", "--shard-rows",
                   "--flush-seconds", "--progress", "--no-progress"):
        assert option in text, option
    assert "(default 2.0)" in text and "(default 0.25)" in text and "smollm2-135m" in text
    # every option of the parser has a help text
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("attribute", "explain"):
        for action in sub.choices[name]._actions:
            assert action.help, (name, action.dest)


def test_tiny_model_end_to_end(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "text": "hello there", "target": "!"},
        {"id": "b", "text": "general kenobi"},
        {"id": "c", "text": "", "target": "x"},
        {"id": "d", "text": "target not one token", "target": "xyz"},
        {"id": "e", "text": "with an id target", "target": 42},
    ])
    out = tmp_path / "out"
    argv = ["attribute", "--data", str(data), "--out", str(out), "--model", str(tiny_dir), "--id-field", "id",
            "--target-field", "target", "--temperature", "1.5", "--v-scale", "none", "--html-report", "2",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "attributed 3 rows" in printed and "tokens/s" in printed
    assert "2 bad rows set aside" in printed and "first: line 3: empty text" in printed
    assert "complete: 3 of 5 input rows" in printed
    rows = {r["id"]: r for r in table_rows(out)}
    assert set(rows) == {"a", "b", "e"}
    assert rows["a"]["target"] == "!" and rows["a"]["target_given"] and rows["e"]["target_id"] == 42
    assert not rows["b"]["target_given"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["softmax_temperature"] == 1.5 and manifest["config"]["v_scale"] is None
    assert manifest["files"]["report"] == "report.html" and (out / "report.html").is_file()
    # the same rows from the Python API with the same settings
    from gim_fast.models import load_pretrained

    model, tok = load_pretrained(tiny_dir)
    api = {r.id: r for r in gim_fast.attribute_dataset(data, model, tokenizer=tok, id_field="id",
                                                       target_field="target", softmax_temperature=1.5, v_scale=None)}
    for key, row in rows.items():
        assert np.array_equal(np.array(row["scores"], np.float32), api[key].scores)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet", "txt"])
def test_every_format_from_the_command_line(suffix, tiny_dir, tmp_path, capsys):
    path = tmp_path / f"in.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(PROMPTS) + "\n")
    elif suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": PROMPTS}), path)
    else:
        sep = "," if suffix == "csv" else "\t"
        path.write_text("prompt\n" + "\n".join(f'"{p}"' if sep == "," else p for p in PROMPTS) + "\n")
    out = tmp_path / "out"
    field = [] if suffix == "txt" else ["--text-field", "prompt"]
    assert main(["attribute", "--data", str(path), "--out", str(out), "--model", str(tiny_dir), *field,
                 "--no-progress"]) == 0
    assert [r["text"] for r in table_rows(out)] == PROMPTS


def test_usage_errors_are_one_line(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, {"text": ""}])
    cases = [
        (["--data", tmp_path / "missing.jsonl"], "no such input file"),
        (["--data", tmp_path / "in.xml"], "--format"),
        (["--data", data, "--text-field", "prompt", "--format", "csv"], "no column 'prompt'"),
        (["--data", data, "--strict"], "line 2: empty text"),
        (["--data", data, "--model", tmp_path / "nowhere"], "no such file or directory"),
        (["--data", data, "--batch-tokens", "0"], "--batch-tokens"),
        (["--data", data, "--baseline", "abc"], "not one token"),
    ]
    (tmp_path / "in.xml").write_text("<x/>")
    for extra, message in cases:
        argv = ["attribute", "--out", tmp_path / "out", "--model", tiny_dir, "--no-progress", *extra]
        done = run_cli(argv) if message == "line 2: empty text" else None
        if done is not None:       # one case through a real process: exit code 2, no traceback
            assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
            continue
        code = _main_code([str(a) for a in argv])
        assert code[0] == 2, (extra, code)
        assert message in code[1] and "Traceback" not in code[1], (extra, code[1])


def _main_code(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:     # argparse errors
            code = e.code
    return code, err.getvalue()


def test_mismatched_rerun_is_refused(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": p} for p in PROMPTS])
    argv = ["attribute", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(tiny_dir),
            "--no-progress"]
    assert main(argv) == 0
    code, err = _main_code([*argv, "--no-freeze-norm"])
    assert code == 2 and "freeze_norm: True → False" in err and "choose a new --out" in err
    code, err = _main_code([*argv, "--batch-tokens", "64"])
    assert code == 2 and "batch_tokens: 4096 → 64" in err


def test_torchrun_two_cpu_processes(tiny_dir, tmp_path):
    import random

    rng = random.Random(3)
    data = write_jsonl(tmp_path / "in.jsonl", [
        {"id": str(i), "text": "".join(rng.choice("abcd efg") for _ in range(rng.randint(2, 30)))} for i in range(40)])
    args = ["attribute", "--data", str(data), "--model", str(tiny_dir), "--id-field", "id", "--batch-tokens", "64",
            "--shard-rows", "4", "--no-progress"]
    out = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gim_fast", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout and "complete: 40 of 40" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 40
    assert set(manifest["counts"]["rows_per_rank"]) == {"0", "1"} and sum(manifest["counts"]["rows_per_rank"].values()) == 40
    ranks = {json.loads(__import__("pyarrow.parquet", fromlist=["x"]).read_schema(p).metadata[b"gim_fast"])["rank"]
             for p in (out / "data").glob("part-*.parquet")}
    assert ranks == {0, 1}                                           # each rank wrote its own shards
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    dist_rows, single_rows = table_rows(out), table_rows(single)
    assert [r["line"] for r in dist_rows] == list(range(1, 41))     # every row exactly once
    for a, b in zip(dist_rows, single_rows):
        assert (a["id"], a["token_ids"], a["target_id"]) == (b["id"], b["token_ids"], b["target_id"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)


def test_smollm2_end_to_end(smollm2, tmp_path, capsys):
    model, tok = smollm2
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": PROMPTS[0], "target": " Paris"},
                                               {"text": PROMPTS[1]}, {"text": PROMPTS[2], "target": " London"},
                                               {"text": PROMPTS[3], "target": " Pariss"}])
    out = tmp_path / "out"
    assert main(["attribute", "--data", str(data), "--out", str(out), "--target-field", "target",
                 "--html-report", "3", "--no-progress"]) == 0
    assert "complete: 3 of 4 input rows" in capsys.readouterr().out
    rows = table_rows(out)
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert rows[0]["target"] == " Paris" and rows[0]["tokens"][-2:] == [" France", " is"]
    assert rows[1]["target"] == " Tokyo" and not rows[1]["target_given"]    # the model's own prediction
    for r in rows:
        ids = torch.tensor(r["token_ids"])
        alone = gim_fast.explain(model, ids, tokenizer=tok, target_token_id=r["target_id"])
        np.testing.assert_allclose(r["scores"], alone.numpy(), rtol=1e-4, atol=1e-5)
    error = json.loads((out / "errors.jsonl").read_text())
    assert error["line"] == 4 and error["reason"].startswith("unknown target token ' Pariss'")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"] == "smollm2-135m" and manifest["config"]["model_class"] == "LlamaForCausalLM"
    assert "France" in (out / "report.html").read_text()


def test_explain_html(smollm2, tmp_path, capsys):
    page = tmp_path / "paris.html"
    assert main(["explain", "The capital of France is", "--html", str(page), "--color", "never"]) == 0
    html = page.read_text()
    assert "&#x27; Paris&#x27;" in html or "' Paris'" in html
    assert html.count('class="tok"') == 5 and "score +" in html
    code, err = _main_code(["explain", "The capital of France is", "--html", str(tmp_path / "no" / "x.html")])
    assert code == 2 and "--html" in err
