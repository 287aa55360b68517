"""A job's output directory: Parquet shards, ``manifest.json``, ``errors.jsonl``; every file written atomically.

Layout::

    OUT/manifest.json     the model, every GIM setting, the input's fingerprint, versions, row counts, status
    OUT/errors.jsonl      one JSON object per bad row: line, id, reason (and the start of its text)
    OUT/data/part-*.parquet  the results, one row per input row; read the folder with pandas/pyarrow/polars
    OUT/report.html       the first rows as coloured tokens (with --html-report N)

A file is first written under a temporary name starting with '.' (which Parquet readers ignore), flushed to
disk, then renamed: a job killed at any moment leaves whole files or no file, never a half-written one.
Each shard records in its Parquet metadata which batches of the plan it holds; a resumed job computes the others.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["JobError", "write_atomic", "write_shard", "done_batches", "read_manifest", "create_manifest",
           "compare_configs", "finalize_manifest", "write_errors", "OutputLock", "SCHEMA_FIELDS",
           "ANSWER_SCHEMA_FIELDS", "read_results"]

MANIFEST, ERRORS, DATA, REPORT = "manifest.json", "errors.jsonl", "data", "report.html"
_META_KEY = b"gim_fast"
_FORMAT = "gim_fast-attribution-job"
_VERSION = 1
ANSWER_SCHEMA_FIELDS = ("id", "line", "text", "token_ids", "tokens", "answer", "answer_ids", "answer_tokens",
                        "answer_given", "scores", "answer_logits", "answer_logprobs")
SCHEMA_FIELDS = ("id", "line", "text", "token_ids", "tokens", "scores", "target_id", "target", "target_logit",
                 "target_position", "target_given")


class JobError(ValueError):
    """A job that cannot start or go on (a mismatched rerun, a locked or foreign directory): one clear line."""


def _crash_point(name: str) -> None:
    """Fault injection for the resume tests: ``GIM_FAST_JOB_CRASH=name:n`` kills this process (SIGKILL, like
    ``kill -9``) the n-th time it reaches ``name``. Unset (always, outside tests) it costs one dict lookup."""
    spec = os.environ.get("GIM_FAST_JOB_CRASH")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _crash_point.seen[name] = _crash_point.seen.get(name, 0) + 1
    if _crash_point.seen[name] >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_crash_point.seen = {}


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Write ``data`` to ``path`` through a temporary file and a rename (or, with ``exclusive``, a hard link that
    fails when ``path`` exists). Returns False when ``exclusive`` and the file was already there."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            _crash_point(f"rename-{path.name}")
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def remove_stale_tmp(out: Path) -> None:
    """Temporary files of killed runs (their process is gone)."""
    for folder in (out, out / DATA):
        for tmp in folder.glob(".*.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ------------------------------------------------------------------------------------------------ shards


def _lists(values, value_type, np_type):
    """A pyarrow list column from a list of 1-D sequences, built from one flat array (no per-value Python)."""
    import pyarrow as pa

    flat = (np.concatenate([np.asarray(v, dtype=np_type).reshape(-1) for v in values]) if values
            else np.zeros(0, np_type))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([np.asarray(v).size for v in values], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _matrices(values):
    """A ``list<list<float32>>`` column from a list of 2-D float arrays (one list per row of each)."""
    import pyarrow as pa

    rows = [np.asarray(v, dtype=np.float32) for v in values]
    inner = _lists([row for matrix in rows for row in matrix], pa.float32(), np.float32)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([m.shape[0] for m in rows], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _table(results: list, meta: dict):
    import pyarrow as pa

    columns = {
        "id": pa.array([r.id for r in results], pa.string()),
        "line": pa.array([r.line for r in results], pa.int64()),
        "text": pa.array([r.text for r in results], pa.string()),
        "token_ids": _lists([r.token_ids for r in results], pa.int32(), np.int32),
        "tokens": pa.array([list(r.tokens) for r in results], pa.list_(pa.string())),
    }
    if results and hasattr(results[0], "answer_ids"):        # answer jobs (answer_field / generate)
        columns.update({
            "answer": pa.array([r.answer for r in results], pa.string()),
            "answer_ids": _lists([r.answer_ids for r in results], pa.int32(), np.int32),
            "answer_tokens": pa.array([list(r.answer_tokens) for r in results], pa.list_(pa.string())),
            "answer_given": pa.array([r.answer_given for r in results], pa.bool_()),
            "scores": _matrices([r.scores for r in results]),
            "answer_logits": _lists([r.answer_logits for r in results], pa.float32(), np.float32),
            "answer_logprobs": _lists([r.answer_logprobs for r in results], pa.float32(), np.float32),
        })
    else:
        columns.update({
            "scores": _lists([r.scores for r in results], pa.float32(), np.float32),
            "target_id": pa.array([r.target_id for r in results], pa.int32()),
            "target": pa.array([r.target for r in results], pa.string()),
            "target_logit": pa.array([r.target_logit for r in results], pa.float32()),
            "target_position": pa.array([r.target_position for r in results], pa.int32()),
            "target_given": pa.array([r.target_given for r in results], pa.bool_()),
        })
    if results and getattr(results[0], "template", None) is not None:   # --chat: the template's tokens
        columns["template"] = pa.array([list(r.template) for r in results], pa.list_(pa.bool_()))
    table = pa.table(columns)
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def shard_path(out: Path, first_batch: int) -> Path:
    return out / DATA / f"part-{first_batch:06d}.parquet"


def _read_tokens(result) -> int:
    """The tokens the model read for a result: its text's, and its answer's (an answer job): the same count as
    the run's summary (``Row.size``)."""
    return len(result.token_ids) + len(getattr(result, "answer_ids", None) or ())


def write_shard(out: Path, batches: list[int], results: list, *, rank: int, config_sha256: str) -> Path:
    """Write the results of ``batches`` as one Parquet shard, atomically; named after its first batch."""
    import pyarrow.parquet as pq

    path = shard_path(out, batches[0])
    meta = {"batches": batches, "rank": rank, "rows": len(results), "tokens": sum(_read_tokens(r) for r in results),
            "config_sha256": config_sha256}
    table = _table(results, meta)
    tmp = _tmp_name(path)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _crash_point("shard-tmp")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _crash_point("shard")
    return path


def shard_metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[_META_KEY])
    except Exception as e:
        raise JobError(f"{path} is not a shard written by gim_fast ({e}); remove it and run the job again") from None


def done_batches(out: Path, config_sha256: str) -> dict[int, Path]:
    """Every batch already in a shard of ``out`` → its shard."""
    done: dict[int, Path] = {}
    for path in sorted((out / DATA).glob("part-*.parquet")):
        meta = shard_metadata(path)
        if meta.get("config_sha256") != config_sha256:
            raise JobError(f"{path} was written by a job with other settings; remove it (or the whole output "
                           "directory) and run again")
        for b in meta["batches"]:
            if b in done:
                raise JobError(f"batch {b} is in two shards, {done[b].name} and {path.name}: were two jobs run at "
                               "once into this directory? remove the output directory and run again")
            done[b] = path
    return done


def read_results(out: str | os.PathLike, *, columns: list[str] | None = None, filters=None):
    """All shards of the job directory ``out`` as one pyarrow Table, sorted by input line (None: no shard yet).
    ``columns`` and ``filters`` are those of ``pyarrow.parquet.read_table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted((Path(out) / DATA).glob("part-*.parquet"))
    if not paths:
        return None
    table = pa.concat_tables([pq.read_table(p, columns=columns, filters=filters).replace_schema_metadata(None)
                              for p in paths])
    return table.sort_by("line") if "line" in table.column_names else table


# ---------------------------------------------------------------------------------------------- manifest


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("gim-fast", "torch", "transformers", "tokenizers", "pyarrow"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise JobError(f"{path} cannot be read ({e}); remove the output directory and run again") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise JobError(f"{path} is not the manifest of a gim_fast job; choose another --out directory")
    return data


def compare_configs(old: dict, new: dict) -> list[str]:
    """Each setting that differs, as 'key: old → new'."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return diffs


def create_manifest(out: Path, config: dict, config_sha256: str, counts: dict) -> dict:
    """The manifest of a new job (written only if none exists; a concurrent rank may have written it first)."""
    manifest = {"format": _FORMAT, "version": _VERSION, "status": "running", "created": _now(), "completed": None,
                "config": config, "config_sha256": config_sha256, "versions": versions(), "counts": counts,
                "files": {"data": f"{DATA}/", "errors": ERRORS}}
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode(),
                 exclusive=True)
    return read_manifest(out)


def finalize_manifest(out: Path, manifest: dict, *, planned_batches: int, report: str | None) -> dict | None:
    """When every planned batch is in a shard: count the rows of all shards, mark the job complete."""
    import pyarrow.parquet as pq

    per_rank: dict[str, int] = {}
    rows = tokens = 0
    batches = set()
    shards = sorted((out / DATA).glob("part-*.parquet"))
    for path in shards:
        meta = shard_metadata(path)
        batches.update(meta["batches"])
        per_rank[str(meta["rank"])] = per_rank.get(str(meta["rank"]), 0) + meta["rows"]
        rows += pq.ParquetFile(path).metadata.num_rows   # counted from the data, not from our own metadata
        tokens += meta["tokens"]
    if len(batches) < planned_batches:
        return None
    manifest = dict(manifest)
    manifest["status"] = "complete"
    manifest["completed"] = manifest.get("completed") or _now()
    manifest["versions"] = manifest.get("versions") or versions()
    counts = dict(manifest.get("counts", {}))
    counts.update({"rows": rows, "tokens": tokens, "shards": len(shards), "rows_per_rank": per_rank})
    manifest["counts"] = counts
    if report:
        manifest["files"] = {**manifest.get("files", {}), "report": report}
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest


def write_errors(out: Path, errors: Iterable) -> None:
    lines = "".join(json.dumps(e.as_dict(), ensure_ascii=False) + "\n" for e in errors)
    write_atomic(out / ERRORS, lines.encode())


class OutputLock:
    """An exclusive lock per rank on the output directory, so that two jobs never write into it at once.

    ``flock`` locks die with their process, so a job killed with ``kill -9`` leaves no stale lock behind."""

    def __init__(self, out: Path, rank: int):
        self.path = out / f".lock-rank{rank}"
        self.fd = None

    def __enter__(self):
        import fcntl

        if self.fd is not None:      # already held (taken early to check the directory)
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise JobError(f"another gim-fast job is writing into {self.path.parent} right now; wait for it, or "
                           "choose another --out directory") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
