"""SLURM-array style jobs: ``gim-fast attribute --shard K/N`` (or the shard a SLURM job array task gets from
``SLURM_ARRAY_TASK_ID``/``_MIN``/``_COUNT``), each shard an independent process, and ``gim-fast status OUT``.

Three shards run as three separate processes in no particular order, one killed mid-way (``kill -9`` through the
``GIM_FAST_JOB_CRASH`` hook) and run again: the union of their files holds every row exactly once and equals a
one-process run bit for bit; ``gim-fast status`` reports the missing rows of the killed shard (exit 1) and then a
complete data set (exit 0).
"""
import json
import os
import signal

import pytest
import torch

from gim_fast.cli import main
from gim_fast.jobs.batching import owners_for
from gim_fast.jobs.inputs import InputError
from gim_fast.jobs.ranks import Ranks, parse_shard, rank_gpus, resolve_ranks

from jobs_support import random_records, run_cli, save_tiny, table_rows, write_jsonl

# bit-identical comparisons between processes: one thread everywhere (see conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {"OMP_NUM_THREADS": "1"}
ROWS = 60


@pytest.fixture(scope="module")
def job(one_thread, tmp_path_factory):
    """The data, the command and the one-process reference run (computed under the pinned single thread)."""
    root = tmp_path_factory.mktemp("shards")
    model = save_tiny(root / "model")
    records = random_records(1, ROWS)
    records[7]["text"] = ""                          # a bad row: in errors.jsonl of every run alike
    data = write_jsonl(root / "in.jsonl", records)
    args = ["attribute", "--data", data, "--model", model, "--id-field", "id", "--target-field", "target",
            "--batch-tokens", "96", "--shard-rows", "2", "--no-progress"]
    reference = root / "reference"
    assert torch.get_num_threads() == one_thread == 1
    assert main([*map(str, args), "--out", str(reference)]) == 0
    return args, reference


def _slurm(task: int, first: int = 5, count: int = 3) -> dict:
    """The environment of task ``task`` of ``sbatch --array=5-7`` (count 3)."""
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_MAX": str(first + count - 1), "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_JOB_ID": "4242"}


def test_three_shards_one_killed_equal_one_process(job, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    # shard 2 first (it writes the manifest), from its SLURM array task's environment
    done = run_cli([*args, "--out", out], env={**ENV, **_slurm(7)})
    assert done.returncode == 0, done.stderr
    assert "shard 2 of 3: attributed" in done.stdout and "not complete yet" in done.stdout
    # shard 1, given on the command line, killed in the middle of its batches
    killed = run_cli([*args, "--out", out, "--shard", "1/3"], env={**ENV, "GIM_FAST_JOB_CRASH": "batch:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = run_cli([*args, "--out", out], env={**ENV, **_slurm(5)})          # shard 0
    assert done.returncode == 0, done.stderr

    status = run_cli(["status", out])
    assert status.returncode == 1, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert "3 shards (a SLURM array)" in lines[0]
    shard0, shard1, shard2 = (next(line for line in lines if f"shard {k}/3:" in line) for k in range(3))
    assert "complete" in shard0 and "complete" in shard2 and "missing" in shard1
    assert lines[-1].startswith("not complete:") and "(shard 1)" in lines[-1]

    again = run_cli([*args, "--out", out, "--shard", "1/3"], env=ENV)      # the requeued task
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stdout and "complete:" in again.stdout

    rows, expected = table_rows(out), table_rows(reference)
    assert rows == expected                          # every row once, bit for bit: ids, tokens, float32 scores
    assert sorted(r["line"] for r in rows) == [line for line in range(1, ROWS + 1) if line != 8]
    assert (out / "errors.jsonl").read_text() == (reference / "errors.jsonl").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["counts"]["rows_per_rank"]) == {"0", "1", "2"}
    assert manifest["config_sha256"] == json.loads((reference / "manifest.json").read_text())["config_sha256"]

    status = run_cli(["status", out])
    assert status.returncode == 0, status.stdout
    assert status.stdout.splitlines()[-1] == f"complete: all {ROWS - 1} rows are in {out / 'data'}"


def test_shards_are_fixed_and_disjoint(job):
    """Each batch belongs to exactly one shard, the same one whatever is already done; the split balances the
    padded tokens (longest-processing-time first)."""
    args, reference = job
    plan = json.loads((reference / "manifest.json").read_text())["plan"]
    owners = owners_for(plan["padded_tokens"], 3)
    assert owners == owners_for(plan["padded_tokens"], 3) and set(owners) == {0, 1, 2}
    loads = [sum(t for t, o in zip(plan["padded_tokens"], owners) if o == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(plan["padded_tokens"])
    assert plan["shards"] == 1 and plan["owners"] == [0] * len(owners)


def test_status_of_a_reference_run_and_of_other_splits(job, capsys):
    args, reference = job
    assert main(["status", str(reference)]) == 0
    assert "shard 0/1:" in capsys.readouterr().out
    assert main(["status", str(reference), "--shards", "4"]) == 0
    printed = capsys.readouterr().out
    assert all(f"shard {k}/4:" in printed for k in range(4))


def test_status_refuses_what_is_not_a_job(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "absent")]) == 2


def test_shard_is_its_own_option(job, tmp_path, capsys):
    """``--shard 0/3`` is the shard, never ``--shard-rows`` (no prefix matching on attribute); a bad value is a
    one-line error before the model loads."""
    from gim_fast.cli import build_parser

    args, _ = job
    parsed = build_parser().parse_args([*map(str, args), "--out", "x", "--shard", "0/3"])
    assert parsed.shard == (0, 3) and parsed.shard_rows == 2
    for bad, message in ((["--shard", "3/3"], "expected 0 <= K < N"), (["--shard", "1"], "expected K/N"),
                         (["--shard-r", "5"], "unrecognized arguments: --shard-r"),
                         (["--batch-tok", "5"], "unrecognized arguments: --batch-tok")):
        with pytest.raises(SystemExit) as exit_:
            main([*map(str, args), "--out", str(tmp_path / "o"), *bad])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_bad_slurm_arrays_and_conflicts_are_refused(job, tmp_path, monkeypatch):
    args, _ = job
    listed = {**_slurm(6), "SLURM_ARRAY_TASK_MAX": "9"}      # --array=5,6,9: a list, not a range
    done = run_cli([*args, "--out", tmp_path / "o"], env={**ENV, **listed})
    assert done.returncode == 2 and "not a range" in done.stderr and not (tmp_path / "o").exists()
    done = run_cli([*args, "--out", tmp_path / "o", "--shard", "0/2"], env={**ENV, "WORLD_SIZE": "2", "RANK": "0"})
    assert done.returncode == 2 and "drop --shard" in done.stderr
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    stepped = {**_slurm(9), "SLURM_ARRAY_TASK_MAX": "9", "SLURM_ARRAY_TASK_STEP": "2"}   # --array=5-9:2: 5, 7, 9
    for key, value in stepped.items():
        monkeypatch.setenv(key, value)
    assert resolve_ranks() == Ranks(2, 3, False, "slurm")
    assert resolve_ranks("0/4") == Ranks(0, 4, False, "shard")   # an explicit shard wins over the array's
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    with pytest.raises(InputError, match="not a range"):
        resolve_ranks()


def test_parse_shard():
    assert parse_shard("2/5") == (2, 5) and parse_shard((0, 1)) == (0, 1)
    for bad in ("5/5", "-1/3", "a/b", "1/0", (1,), (True, 2)):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_each_process_of_a_node_gets_its_own_gpus():
    """Under torchrun a device map strategy spreads each process's model over its own GPUs of the node."""
    assert [rank_gpus(8, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [rank_gpus(4, r, 3) for r in range(3)] == [[0], [1], [2]]
    with pytest.raises(InputError, match="at least one GPU"):
        rank_gpus(2, 0, 4)


def test_no_slurm_no_shard_is_one_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_ranks() == Ranks(0, 1)
    assert os.environ.get("SLURM_ARRAY_TASK_ID") is None
