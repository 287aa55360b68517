"""Every command-line argument is checked before anything loads: a bad one is a one-line error with exit code 2,
never a traceback after minutes of loading; and the messages a new user reads (plurals, what a model folder lacks,
a .gguf file that is not one)."""
import json
import os
import warnings
from pathlib import Path

import pytest

import gim_fast.models
from gim_fast.cli import main

from cli_support import refused as _refused
from jobs_support import run_cli, save_tiny, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("checks") / "tiny")


def _unwritable_dirs(tmp_path):
    """Folders this process cannot create anything in, even as root: /proc (on Linux), and a folder without write
    permission when not root."""
    found = []
    if Path("/proc").is_dir():
        found.append(Path("/proc"))
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        found.append(locked)
    return found


# ------------------------------------------------------------------------------------------------- explain

def test_explain_arguments_are_checked_before_loading(no_loading, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused(["explain", "hi", "--width", "-5"], "--width", "integer >= 0")
    _refused(["explain", "hi", "--width", "wide"], "--width")
    _refused(["explain", ""], "TEXT is empty")
    _refused(["explain", "hi", "--target", "-3"], "--target -3")
    _refused(["explain", "hi", "--html", tmp_path / "missing" / "x.html"], "--html", "does not exist")
    _refused(["explain", "hi", "--html", a_file / "x.html"], "--html", "is a file")
    _refused(["explain", "hi", "--html", tmp_path], "--html", "is a directory")
    for folder in _unwritable_dirs(tmp_path):
        _refused(["explain", "hi", "--html", folder / "x.html"], "--html", "cannot write")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _refused(["explain", "hi", "--backend", "triton"], "backend='triton'")


def test_explain_width_zero_and_a_one_token_text(tiny_dir, capsys):
    assert main(["explain", "a", "--model", str(tiny_dir), "--width", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert ", 1 token\n" in out and "1 tokens" not in out
    assert "█" not in out


# ------------------------------------------------------------------------------------------------- models

def test_model_folder_without_weights_or_tokenizer(tmp_path, tiny_dir):
    import shutil

    import tiny_models

    bare = tmp_path / "bare"
    tiny_models.config_of("llama").save_pretrained(bare)
    err = _refused(["explain", "hi", "--model", bare], "has a config.json but no weights", "and no tokenizer files")
    assert "You need to have sentencepiece" not in err
    weights_only = tmp_path / "no-tok"
    shutil.copytree(tiny_dir, weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    err = _refused(["explain", "hi", "--model", weights_only], "has a config.json but no tokenizer files")
    assert "no weights" not in err
    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(tiny_dir, tokenizer_only, ignore=shutil.ignore_patterns("*.safetensors"))
    _refused(["explain", "hi", "--model", tokenizer_only], "has a config.json but no weights (model.safetensors")


def test_a_gguf_file_that_is_not_gguf(tmp_path, caplog):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with caplog.at_level("INFO", logger="gim_fast.models"):
        with pytest.raises(ValueError, match="is not a GGUF file"):
            gim_fast.models.load_pretrained(fake, cache_dir=tmp_path / "cache")
    assert not any("converting" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    err = _refused(["explain", "hi", "--model", fake, "--cache-dir", tmp_path / "cache"], "is not a GGUF file")
    assert "converting" not in err


def test_cache_dir_that_is_a_file(tmp_path, no_loading):
    a_file = tmp_path / "cache"
    a_file.write_text("x")
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(20))
    _refused(["explain", "hi", "--model", fake, "--cache-dir", a_file], "the model cache", "not a directory")


# ------------------------------------------------------------------------------------------------- attribute

def test_attribute_arguments_are_checked_before_loading(no_loading, tmp_path, tiny_dir, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    csv_data = tmp_path / "in.csv"
    csv_data.write_text("text\nhello\n", encoding="utf-8")
    txt = tmp_path / "in.txt"
    txt.write_text("hello\n", encoding="utf-8")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = ["attribute", "--model", "smollm2-135m", "--no-progress"]
    _refused([*base, "--data", data, "--out", a_file], "--out", "exists and is not a directory")
    _refused([*base, "--data", data, "--out", a_file / "out"], "--out", "is a file, not a directory")
    _refused([*base, "--data", data, "--out", a_file / "deeper" / "out"], "is a file, not a directory")
    for folder in _unwritable_dirs(tmp_path):
        _refused([*base, "--data", data, "--out", folder / "gim-fast-out"], "--out", "cannot write")
    out = tmp_path / "out"
    _refused([*base, "--data", csv_data, "--out", out, "--text-field", "prompt"], "no column 'prompt'")
    _refused([*base, "--data", csv_data, "--out", out, "--id-field", "key"], "no column 'key'")
    _refused([*base, "--data", txt, "--out", out, "--id-field", "id"], "plain-text input has no fields")
    _refused([*base, "--data", data, "--out", out, "--device", "gpu"], "device 'gpu'")
    _refused([*base, "--data", data, "--out", out, "--model", tmp_path / "nowhere"], "no such file or directory")
    _refused([*base, "--data", data, "--out", out, "--model", "no-such-model"], "unknown model")
    _refused([*base, "--data", data, "--out", out, "--flush-seconds", "0"], "--flush-seconds")
    _refused([*base, "--data", data, "--out", out, "--baseline", "-4"], "baseline token id -4 is negative")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _refused([*base, "--data", data, "--out", out, "--backend", "triton", "--device", "cpu"], "backend='triton'")
    assert not out.exists()                       # nothing was created by a refused command


def test_attribute_unwritable_out_in_a_real_process(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    (tmp_path / "file.txt").write_text("x")
    done = run_cli(["attribute", "--data", data, "--out", tmp_path / "file.txt" / "out", "--no-progress"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "--out" in done.stderr and "is a file" in done.stderr


def test_attribute_summary_speaks_singular(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": ""}])
    out = tmp_path / "out"
    assert main(["attribute", "--data", str(data), "--out", str(out), "--model", str(tiny_dir),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "attributed 1 row (1 token, 1 batch)" in printed, printed
    assert "1 bad row set aside" in printed and "complete: 1 of 2 input rows in 1 shard under" in printed
    assert json.loads((out / "errors.jsonl").read_text()) == {"line": 2, "id": "2", "reason": "empty text",
                                                              "text": ""}


# ------------------------------------------------------------------------------------------------- evaluate

def test_evaluate_arguments_are_checked_before_loading(no_loading, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    base = ["evaluate", "--data", data, "--methods", "gim", "--quiet"]
    _refused([*base, "--out", a_file / "out"], "--out", "is a file")
    _refused([*base, "--out", tmp_path / "o", "--models", "smollm2-135m", "no-such-model"], "no-such-model",
             "unknown model")
    _refused([*base, "--out", tmp_path / "o", "--batch-size", "0"], "--batch-size")
    _refused([*base, "--out", tmp_path / "o", "--threads", "0"], "--threads")
    _refused([*base, "--out", tmp_path / "o", "--temperatures", "none", "2"], "'none' (no sweep) cannot be combined")
    _refused([*base, "--out", tmp_path / "o", "--temperatures", "-1"], "--temperatures")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text"}\n', encoding="utf-8")
    _refused(["evaluate", "--data", bad, "--out", tmp_path / "o", "--quiet"], "bad.jsonl:2", "non-empty \"text\"")


@pytest.mark.parametrize("temperatures", [["none"], []])
def test_evaluate_without_a_sweep(tiny_dir, tmp_path, temperatures, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "in.jsonl"
    data.write_text("\ufeff" + json.dumps({"text": "hello wor"}) + "\n" + json.dumps({"text": "abc"}) + "\n",
                    encoding="utf-8")                                   # with a byte-order mark
    out = tmp_path / "faith"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no matplotlib (or any) warning
        code = main(["evaluate", "--models", str(tiny_dir), "--data", str(data), "--methods", "gim", "random",
                     "--temperatures", *temperatures, "--out", str(out), "--quiet"])
    assert code == 0
    assert not (out / "temperature_sweep.png").exists() and not (out / "temperature_sweep.csv").exists()
    md = (out / "faithfulness.md").read_text()
    assert "--temperatures none" in md and "temperature_sweep.png" not in md
    assert "2 examples" in md


# ------------------------------------------------------------------------------------------------- device maps

@pytest.mark.parametrize("command", ["explain", "attribute", "circuit", "evaluate"])
def test_device_map_options_are_checked_before_loading(command, no_loading, tmp_path):
    """--device-map, --max-memory, --offload-folder: an unknown device, an unparsable size, a folder that cannot be
    written are one-line errors with exit code 2, before any weight is read."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    base = {"explain": ["explain", "hi"],
            "attribute": ["attribute", "--data", data, "--out", tmp_path / "o", "--no-progress"],
            "circuit": ["circuit", "--task", "ioi", "--out", tmp_path / "o"],
            "evaluate": ["evaluate", "--data", data, "--methods", "gim", "--out", tmp_path / "o", "--quiet"]}[command]
    _refused([*base, "--device-map", "tpu"], "--device-map", "unknown device_map 'tpu'", "auto, balanced")
    _refused([*base, "--device-map", "cuda:7"], "--device-map", "unknown device 'cuda:7'")
    _refused([*base, "--device-map", '{"model.layers.0": "gpu"}'], "device_map['model.layers.0']",
             "unknown device 'gpu'")
    _refused([*base, "--device-map", tmp_path / "absent.json"], "--device-map", "cannot read it")
    _refused([*base, "--max-memory", "cpu=12XB"], "--max-memory", "unparsable size '12XB'", "GiB")
    _refused([*base, "--max-memory", "cpu:12GiB"], "--max-memory", "DEVICE=SIZE")
    _refused([*base, "--max-memory", "npu=1GiB"], "--max-memory", "unknown device 'npu'")
    for folder in _unwritable_dirs(tmp_path):
        _refused([*base, "--device-map", "auto", "--offload-folder", folder / "offload"], "--offload-folder",
                 "cannot write")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused([*base, "--device-map", "auto", "--offload-folder", a_file], "--offload-folder", "not a directory")
    _refused([*base, "--offload-folder", tmp_path / "off"], "--offload-folder", "give --device-map")
    assert not (tmp_path / "o").exists() and not (tmp_path / "off").exists()


def test_attribute_device_and_device_map_are_exclusive(no_loading, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    _refused(["attribute", "--data", data, "--out", tmp_path / "o", "--device", "cpu", "--device-map", "auto"],
             "give a device ('cpu') or a device map ('auto'), not both")


def test_bad_device_map_in_a_real_process(tmp_path):
    done = run_cli(["explain", "hi", "--max-memory", "cpu=lots"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("gim-fast explain: error: argument --max-memory: unparsable size")


def test_load_pretrained_checks_the_placement_before_reading_weights(tiny_dir, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    for kwargs, message in (({"device_map": "gpu"}, "unknown device_map 'gpu'"),
                            ({"max_memory": {"cpu": "a lot"}}, "unparsable size 'a lot'"),
                            ({"max_memory": {7: "1GiB"}}, "unknown device 7"),
                            ({"device_map": {"lm_head": "cloud"}}, "unknown device 'cloud'"),
                            ({"device_map": "auto", "offload_folder": tmp_path / "f" / "x"}, None)):
        if message is None:
            (tmp_path / "f").write_text("a file")
            message = "is a file"
        with pytest.raises(ValueError, match=message):
            gim_fast.models.load_pretrained(tiny_dir, **kwargs)
