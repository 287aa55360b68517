"""A job killed with SIGKILL at any moment, started again with the same command, equals an uninterrupted run.

The kills are real (``kill -9`` of a ``python -m gim_fast attribute`` process): at chosen points through the
``GIM_FAST_JOB_CRASH`` fault-injection hook (before any work, mid-shard, between a shard's temporary file and its
rename, right after a shard, during the final manifest write), and once from outside at an arbitrary moment.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gim_fast.cli import main

from jobs_support import ROOT, random_records, run_cli, save_tiny, table_rows, write_jsonl


# Bit-identical comparisons between processes: one thread everywhere, pinned (conftest's module-scoped one_thread)
# before the reference is computed; subprocesses get OMP_NUM_THREADS=1.
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job(one_thread, tmp_path_factory):
    """The uninterrupted reference run, computed under the same single thread as the runs compared with it."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny(root / "model")
    records = random_records(0, 60)
    records[5]["text"] = ""                 # bad rows are reported identically by every run
    records[9]["target"] = "not one token"
    data = write_jsonl(root / "in.jsonl", records)
    args = ["attribute", "--data", data, "--model", model, "--id-field", "id", "--target-field", "target",
            "--batch-tokens", "96", "--shard-rows", "6", "--no-progress"]
    reference = root / "reference"
    assert torch.get_num_threads() == one_thread == 1     # pinned before the reference computes
    assert main([*map(str, args), "--out", str(reference)]) == 0
    return args, reference


def _assert_same_as(reference, out):
    rows, expected = table_rows(out), table_rows(reference)
    assert rows == expected                              # exactly: ids, tokens, float32 scores, targets, logits
    lines = [r["line"] for r in rows]
    errors = [json.loads(e)["line"] for e in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(lines + errors) == list(range(1, 61))  # every input row exactly once, in a shard or an error
    assert (out / "errors.jsonl").read_text() == (reference / "errors.jsonl").read_text()
    manifest, ref_manifest = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert manifest["status"] == "complete" and manifest["config_sha256"] == ref_manifest["config_sha256"]
    for key in ("input_rows", "rows", "errors", "tokens", "batches"):
        assert manifest["counts"][key] == ref_manifest["counts"][key], key
    assert not list(out.rglob(".*.tmp-*"))               # leftovers of the killed run are gone


@pytest.mark.parametrize("point", ["rename-errors.jsonl:1", "batch:4", "shard-tmp:2", "shard:1",
                                   "rename-manifest.json:1"])
def test_resume_after_kill_at(point, job, tmp_path, capsys):
    args, reference = job
    out = tmp_path / "out"
    killed = run_cli([*args, "--out", out], env={**ENV, "GIM_FAST_JOB_CRASH": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    if point == "shard-tmp:2":
        assert list((out / "data").glob(".part-*.tmp-*"))     # a temporary file the rerun must ignore
    assert main([*map(str, args), "--out", str(out)]) == 0
    assert "complete: 57 of 60 input rows" in capsys.readouterr().out
    _assert_same_as(reference, out)


def test_resume_after_kill_from_outside(job, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    slow = [*args, "--batch-size", "1", "--shard-rows", "2"]      # many small shards: time to kill it mid-way
    reference_slow = tmp_path / "reference-slow"
    cmd = [sys.executable, "-m", "gim_fast", *map(str, slow), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list((out / "data").glob("part-*"))) < 3:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    shards = len(list((out / "data").glob("part-*")))
    assert 3 <= shards < 29
    assert main([*map(str, slow), "--out", str(out)]) == 0
    assert main([*map(str, slow), "--out", str(reference_slow)]) == 0
    _assert_same_as(reference_slow, out)
    assert run_cli([*slow, "--out", out], env=ENV).returncode == 0      # a finished job: nothing to do
