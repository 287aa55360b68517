"""``gim-fast status OUT``: what a job folder holds, per shard of its plan, read without writing anything.

The manifest records the plan's layout (rows and padded tokens per batch, the number of shards it was split into
and each batch's shard); each Parquet file records the batches it holds. A batch is done when a file holds it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..display import plural
from . import writer
from .batching import owners_for

__all__ = ["ShardStatus", "JobStatus", "job_status"]


@dataclass(frozen=True)
class ShardStatus:
    """One shard: its batches and rows, and how many of them are in the folder."""

    index: int
    batches: int
    rows: int
    done_batches: int
    done_rows: int

    @property
    def missing_rows(self) -> int:
        return self.rows - self.done_rows

    @property
    def complete(self) -> bool:
        return self.done_batches == self.batches


@dataclass(frozen=True)
class JobStatus:
    """A job folder's progress: per shard, and for the whole data set."""

    out: Path
    model: str
    input: str
    input_rows: int
    errors: int
    shards: list[ShardStatus]
    split: str

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def done_rows(self) -> int:
        return sum(s.done_rows for s in self.shards)

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.shards)

    def report(self) -> str:
        """The lines ``gim-fast status`` prints."""
        n = len(self.shards)
        how = {"shard": "--shard", "slurm": "a SLURM array", "torchrun": "torchrun"}.get(self.split)
        lines = [f"{self.out}: {self.model} on {self.input}: {plural(self.input_rows, 'input row')}, {self.rows} to "
                 f"attribute ({plural(self.errors, 'bad row')} in {writer.ERRORS}), {plural(n, 'shard')}"
                 + (f" ({how})" if how else "")]
        for s in self.shards:
            state = "complete" if s.complete else f"{s.missing_rows} missing"
            lines.append(f"  shard {s.index}/{n}: {s.done_rows} of {s.rows} rows done, {state} "
                         f"({s.done_batches} of {s.batches} batches)")
        if self.complete:
            lines.append(f"complete: all {self.rows} rows are in {os.path.join(self.out, writer.DATA)}")
        else:
            missing = [str(s.index) for s in self.shards if not s.complete]
            lines.append(f"not complete: {self.rows - self.done_rows} of {self.rows} rows missing (shard"
                         f"{'s' * (len(missing) != 1)} {', '.join(missing)}); run {'them' if len(missing) != 1 else 'it'}"
                         f" (the same command with --shard K/{n}, or requeue the array task"
                         f"{'s' * (len(missing) != 1)}) to finish the data set")
        return "\n".join(lines)


def job_status(out: str | os.PathLike, *, shards: int | None = None) -> JobStatus:
    """The progress of the job folder ``out`` (``writer.JobError`` when it is not one). ``shards``: split the plan
    into this many shards instead of the number the job was started with."""
    out = Path(out)
    if not out.is_dir():
        raise writer.JobError(f"{out} is not a folder; give the OUT folder of a gim-fast attribute job")
    manifest = writer.read_manifest(out)
    if manifest is None:
        raise writer.JobError(f"{out} holds no {writer.MANIFEST}: not a gim-fast attribute job folder, or one whose "
                              "first process has not started yet")
    plan = manifest.get("plan")
    if plan is None:
        raise writer.JobError(f"{out / writer.MANIFEST} has no plan layout (a job started by an older gim-fast); "
                              "its status is in the manifest's 'status' and 'counts'")
    rows = plan["rows"]
    n = shards or plan["shards"]
    owners = plan["owners"] if n == plan["shards"] else owners_for(plan["padded_tokens"], n)
    done = writer.done_batches(out, manifest["config_sha256"])
    per_shard = []
    for k in range(n):
        mine = [b for b, owner in enumerate(owners) if owner == k]
        finished = [b for b in mine if b in done]
        per_shard.append(ShardStatus(k, len(mine), sum(rows[b] for b in mine), len(finished),
                                     sum(rows[b] for b in finished)))
    config, counts = manifest.get("config", {}), manifest.get("counts", {})
    return JobStatus(out, str(config.get("model")), str(config.get("input")), counts.get("input_rows", 0),
                     counts.get("errors", 0), per_shard, plan.get("split", ""))
