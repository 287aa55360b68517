"""``attribute_dataset``: GIM attributions for every row of a data set, batched, resumable, across processes.

The job is planned first, identically in every process: read all rows, tokenize them, set bad rows aside,
group the good ones by length into batches under a token budget, and give each batch to a rank. Then each
rank computes its batches, yields the results, and (with an output directory) writes them as Parquet shards,
each shard atomically and labelled with the batches it holds. Started again after a crash, the same plan is
rebuilt and only the batches that are in no shard are computed: every row ends up exactly once, with exactly
the numbers an uninterrupted run gives (each batch has the same neighbours, and is computed by the same code).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..settings import GIMSettings
from . import writer
from .batching import Batch, Row, TargetResolver, assign_ranks, pack, tokenize_rows
from ..outputs import check_output_dir
from ..settings import resolve_backend
from .inputs import InputError, RowError, check_input, detect_format, fingerprint, read_rows

__all__ = ["attribute_dataset", "DatasetRun", "RowResult", "BadRowError", "DEFAULT_BATCH_TOKENS"]

log = logging.getLogger(__name__)
_DEFAULTS = GIMSettings()
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_SHARD_ROWS = 10_000
DEFAULT_FLUSH_SECONDS = 600.0


class BadRowError(ValueError):
    """``strict=True`` and a row cannot be attributed: the first such row, with its line number and reason."""

    def __init__(self, error: RowError):
        self.error = error
        super().__init__(f"line {error.line}: {error.reason} (strict mode stops at the first bad row)")


@dataclass
class RowResult:
    """The attribution of one input row (the columns of the output shards)."""

    id: str
    line: int
    text: str
    token_ids: list[int]
    tokens: list[str]
    scores: np.ndarray       # float32 [len(token_ids)]
    target_id: int
    target: str
    target_logit: float
    target_position: int     # index of the token whose next-token logit is explained (the last one)
    target_given: bool       # True when the data named the target; False for the model's top prediction


# ------------------------------------------------------------------------------------------ ranks/devices


def _rank_and_world() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) from torch.distributed or the launcher's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world > 1 and dist.is_available() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        import datetime

        # gloo for coordination only (one barrier at the end); the model runs on each rank's own device.
        # Ranks may finish hours apart: the barrier waits long.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        return dist.get_rank(), dist.get_world_size(), True
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, False


def _check_device(device) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a device; accepted: cpu, cuda, cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available here; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif parsed.type != "cpu":
        raise InputError(f"device {device!r}: accepted: cpu, cuda, cuda:N")


def _device(device, rank: int, world: int) -> torch.device:
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- identity


def _model_identity(model) -> dict:
    """What identifies the model for a resumed job: class, config and a digest of (a sample of) every weight."""
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
                     "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(p.shape)).encode())
            digest.update(sample.tobytes())
    return {"model_class": type(model).__name__, "model_digest": digest.hexdigest()[:32]}


def _records_fingerprint(records: list) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def _vocab_out(model) -> int:
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def _baseline(baseline_token, tokenizer, vocab: int) -> int:
    from ..explain import resolve_baseline

    if isinstance(baseline_token, str) and not baseline_token.strip().lstrip("-").isdigit():
        ids = tokenizer.encode(baseline_token, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"baseline token {baseline_token!r} is not one token (it tokenizes to {len(ids)})")
        baseline_token = ids[0]
    elif isinstance(baseline_token, str):
        baseline_token = int(baseline_token)
    baseline = resolve_baseline(baseline_token, tokenizer)
    if not 0 <= baseline < vocab:
        raise InputError(f"baseline token id {baseline} is outside the vocabulary [0, {vocab})")
    return baseline


# ------------------------------------------------------------------------------------------------ compute


class _Decoder:
    """Token id → its text (``tokenizer.decode([id])``), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _compute(model, batch: Batch, baseline: int, settings: GIMSettings, device, decode: _Decoder) -> list[RowResult]:
    """One engine call for the batch, left-padded (every row's last real token is the last position)."""
    from ..engine import attribute

    size, length = len(batch.rows), batch.length
    ids = torch.full((size, length), baseline, dtype=torch.long)
    mask = torch.zeros((size, length), dtype=torch.long)
    for i, row in enumerate(batch.rows):
        n = len(row.token_ids)
        ids[i, length - n:] = torch.tensor(row.token_ids)
        mask[i, length - n:] = 1
    given = batch.rows[0].target_id is not None
    targets = torch.tensor([r.target_id for r in batch.rows], device=device) if given else None
    positions = torch.full((size,), length - 1, dtype=torch.long, device=device)
    result = attribute(model, ids.to(device), mask.to(device), positions, targets, baseline, settings)
    scores = result.scores.float().cpu().numpy()
    target_ids = result.target_ids.cpu().tolist()
    logits = result.target_logits.float().cpu().tolist()
    out = []
    for i, row in enumerate(batch.rows):
        n = len(row.token_ids)
        out.append(RowResult(
            id=row.id, line=row.line, text=row.text, token_ids=list(row.token_ids),
            tokens=[decode(t) for t in row.token_ids], scores=scores[i, length - n:].copy(),
            target_id=int(target_ids[i]), target=decode(int(target_ids[i])), target_logit=float(logits[i]),
            target_position=n - 1, target_given=given))
    return out


# ------------------------------------------------------------------------------------------------- the run


class DatasetRun(Iterator[RowResult]):
    """The iterator :func:`attribute_dataset` returns. Besides the results it exposes, once iteration has
    started, ``errors`` (the bad rows), ``plan`` (the batches), ``rank``/``world_size``, ``out`` and, when it is
    exhausted, ``summary`` (rows, tokens, seconds, rows/s, tokens/s, ...) and ``manifest``."""

    def __init__(self, gen_factory):
        self._factory = gen_factory
        self._gen = None
        self.errors: list[RowError] = []
        self.plan: list[Batch] = []
        self.summary: dict | None = None
        self.manifest: dict | None = None
        self.rank, self.world_size, self.out = 0, 1, None

    def __iter__(self):
        return self

    def __next__(self) -> RowResult:
        if self._gen is None:
            self._gen = self._factory(self)
        return next(self._gen)

    def run(self) -> dict:
        """Consume everything (results go to the output directory only); returns the summary."""
        for _ in self:
            pass
        return self.summary

    def close(self):
        if self._gen is not None:
            self._gen.close()


def attribute_dataset(data, model="smollm2-135m", *, tokenizer=None, out=None, format: str | None = None,
                      text_field: str = "text", target_field: str | None = None, id_field: str | None = None,
                      target_type: str = "auto", batch_tokens: int = DEFAULT_BATCH_TOKENS,
                      batch_size: int | None = None, max_length: int | None = None, strict: bool = False,
                      freeze_norm=_DEFAULTS.freeze_norm, softmax_temperature=_DEFAULTS.softmax_temperature,
                      q_scale=_DEFAULTS.q_scale, k_scale=_DEFAULTS.k_scale, v_scale=_DEFAULTS.v_scale,
                      gate_scale=_DEFAULTS.gate_scale, up_scale=_DEFAULTS.up_scale, backend=_DEFAULTS.backend,
                      baseline_token=None, dtype=torch.float32, device=None, cache_dir=None,
                      shard_rows: int = DEFAULT_SHARD_ROWS, flush_seconds: float = DEFAULT_FLUSH_SECONDS,
                      html_report: int = 0, progress: bool | None = False) -> DatasetRun:
    """GIM attributions for every row of ``data``; an iterator of :class:`RowResult`, one per good row.

    Args:
        data: a file (JSON Lines, CSV/TSV, Parquet, or plain text with one prompt per line; ``format`` overrides
            the suffix), or an iterable of strings or dicts.
        model: a shipped model name (``"smollm2-135m"``), a Hugging Face model directory or a ``.gguf`` file, or
            a loaded model (then pass ``tokenizer`` too).
        out: an output directory for Parquet shards, ``manifest.json`` and ``errors.jsonl``. Started again with
            the same arguments, a job resumes: only rows not yet in a shard are computed (and yielded). Other
            arguments against an existing directory raise :class:`~gim_fast.jobs.writer.JobError`.
        text_field, target_field, id_field: column names. A row's target is a token string (one token) or an id
            (``target_type``: ``"auto"``, ``"token"``, ``"id"``); a row without one explains the model's top
            prediction. Without ``id_field`` a row's id is its ``id`` field when it has one (a JSON key, a CSV or
            Parquet column), else its line number.
        batch_tokens, batch_size: the padded-token budget of one batch, and an optional cap on its rows.
        max_length: rows with more tokens are bad rows (default: the model's ``max_position_embeddings``).
        strict: raise :class:`BadRowError` at the first bad row instead of setting bad rows aside.
        freeze_norm … up_scale, backend: the GIM settings, as in :func:`gim_fast.explain`. ``baseline_token``:
            an id or a one-token string (default as in ``explain``).
        dtype, device, cache_dir: how a model given by name is loaded (device default: this rank's GPU, else CPU).
        shard_rows, flush_seconds: a shard is written after this many rows, or this many seconds of work.
        html_report: with ``out``, write ``report.html`` with the first N rows (by input line) at the end.
        progress: a tqdm bar (rows/s, tokens/s, ETA) on stderr; ``None``: when stderr is a terminal.

    Under ``torchrun``/``accelerate launch`` (or an initialised ``torch.distributed``) every process plans the
    same batches and computes its own share; results come out in batch order (longest rows first), not input
    order: sort by ``line`` to restore it.
    """
    settings = GIMSettings(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
                           k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
                           backend=backend)
    for name, value, low in (("batch_tokens", batch_tokens, 1), ("shard_rows", shard_rows, 1),
                             ("html_report", html_report, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
    if target_type not in ("auto", "token", "id"):
        raise ValueError(f"target_type must be 'auto', 'token' or 'id', got {target_type!r}")
    # everything that can be checked without the model fails now, before a model is loaded
    if isinstance(data, (str, os.PathLike)):
        check_input(data, format=format, text_field=text_field, target_field=target_field, id_field=id_field)
    if out is not None:
        check_output_dir(out)
    if device not in (None, "auto"):
        _check_device(device)
    if isinstance(baseline_token, (int, str)) and str(baseline_token).strip().startswith("-") \
            and str(baseline_token).strip()[1:].isdigit():
        raise InputError(f"baseline token id {baseline_token} is negative; a token id is >= 0")
    if isinstance(model, (str, os.PathLike)):
        from ..models import check_model_name

        check_model_name(model, cache_dir=cache_dir)
        resolve_backend(settings.backend, _device(device, 0, 1), dtype)
    options = dict(data=data, model=model, tokenizer=tokenizer, out=out, format=format, text_field=text_field,
                   target_field=target_field, id_field=id_field, target_type=target_type, batch_tokens=batch_tokens,
                   batch_size=batch_size, max_length=max_length, strict=strict, settings=settings,
                   baseline_token=baseline_token, dtype=dtype, device=device, cache_dir=cache_dir,
                   shard_rows=shard_rows, flush_seconds=flush_seconds, html_report=html_report, progress=progress)
    return DatasetRun(lambda run: _run(run, **options))


def _load(model, tokenizer, dtype, cache_dir, device, rank, world):
    """(model on its device, tokenizer, how the model was named). A loaded model stays where it is unless
    ``device`` is given."""
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_pretrained

        spec = os.fspath(model)
        model, tokenizer = load_pretrained(spec, cache_dir=cache_dir, dtype=dtype)
        device = _device(device, rank, world)
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: attribute_dataset(..., tokenizer=tokenizer)")
        spec = getattr(model, "name_or_path", None) or type(model).__name__
        device = _device(device, rank, world) if device is not None else next(model.parameters()).device
    return model.to(device), tokenizer, spec, device


def _run(run: DatasetRun, *, data, model, tokenizer, out, format, text_field, target_field, id_field, target_type,
         batch_tokens, batch_size, max_length, strict, settings, baseline_token, dtype, device, cache_dir,
         shard_rows, flush_seconds, html_report, progress):
    from ..integration import check_model

    started = time.perf_counter()
    rank, world, own_group = _rank_and_world()
    try:
        run.rank, run.world_size = rank, world
        model, tokenizer, spec, device = _load(model, tokenizer, dtype, cache_dir, device, rank, world)
        check_model(model)
        vocab_in = model.get_input_embeddings().num_embeddings
        vocab_out = _vocab_out(model)
        if max_length is None:
            max_length = getattr(model.config, "max_position_embeddings", None)
        baseline = _baseline(baseline_token, tokenizer, vocab_in)

        # --- plan: every rank reads and tokenizes everything, and gets the same batches
        if isinstance(data, (str, os.PathLike)):
            source = {"input": os.path.abspath(data), "input_sha256": fingerprint(data),
                      "format": detect_format(data, format)}
            raw = read_rows(data, format=format, text_field=text_field, target_field=target_field,
                            id_field=id_field)
        else:
            records = list(data)
            source = {"input": "<python objects>", "input_sha256": _records_fingerprint(records), "format": None}
            raw = read_rows(records, text_field=text_field, target_field=target_field, id_field=id_field)
        resolver = TargetResolver(tokenizer, vocab_out, target_type)
        rows: list[Row] = []
        errors: list[RowError] = []
        input_rows = 0
        for item in tokenize_rows(raw, tokenizer, max_length=max_length, vocab_size=vocab_in, targets=resolver):
            input_rows += 1
            if isinstance(item, RowError):
                if strict:
                    raise BadRowError(item)
                errors.append(item)
            else:
                rows.append(item)
        plan = pack(rows, batch_tokens=batch_tokens, batch_size=batch_size)
        owners = assign_ranks(plan, world)
        run.errors, run.plan = errors, plan

        config = {
            **source, "text_field": text_field, "target_field": target_field, "id_field": id_field,
            "target_type": target_type, **_model_identity(model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device_type": device.type, "freeze_norm": settings.freeze_norm,
            "softmax_temperature": settings.softmax_temperature, "q_scale": settings.q_scale,
            "k_scale": settings.k_scale, "v_scale": settings.v_scale, "gate_scale": settings.gate_scale,
            "up_scale": settings.up_scale, "backend": settings.backend, "baseline_token_id": baseline,
            "batch_tokens": batch_tokens, "batch_size": batch_size, "max_length": max_length,
        }
        # what the results depend on (not where the input file lies): shards carry it, a resume compares it
        identity = {k: v for k, v in config.items() if k != "input"}
        config_sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        counts = {"input_rows": input_rows, "errors": len(errors), "batches": len(plan)}

        done: dict[int, Path] = {}
        lock = contextlib.nullcontext()
        if out is not None:
            out = Path(out)
            run.out = out
            lock = _prepare_out(out, rank, spec, config, config_sha, counts, errors)
        with lock:
            if out is not None:
                done = writer.done_batches(out, config_sha)
            todo = [b for b, owner in zip(plan, owners) if owner == rank and b.index not in done]
            compute_started = time.perf_counter()
            yield from _compute_all(model, todo, baseline, settings, device, tokenizer, out, rank, world, config_sha,
                                    shard_rows, flush_seconds, progress, run)
            computed = sum(len(b.rows) for b in todo)
            computed_tokens = sum(b.tokens for b in todo)
            manifest = None
            if out is not None:
                special = getattr(tokenizer, "all_special_ids", ()) or ()
                manifest = _finish(out, plan, html_report, own_group or _group_active(), rank, special)
            ended = time.perf_counter()
            elapsed = ended - compute_started
            run.manifest = manifest
            run.summary = {
                "rank": rank, "world_size": world, "input_rows": input_rows, "rows": computed,
                "tokens": computed_tokens, "padded_tokens": sum(b.padded_tokens for b in todo),
                "errors": len(errors), "batches": len(todo),
                "already_done_batches": sum(1 for b, o in zip(plan, owners) if o == rank and b.index in done),
                "seconds": elapsed, "setup_seconds": compute_started - started,
                "rows_per_s": computed / elapsed if elapsed > 0 else 0.0,
                "tokens_per_s": computed_tokens / elapsed if elapsed > 0 else 0.0,
                "out": None if out is None else str(out), "complete": bool(manifest and manifest["status"] == "complete"),
            }
    finally:
        if own_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_OURS = {"data", writer.ERRORS, writer.MANIFEST, writer.REPORT}


def _prepare_out(out: Path, rank: int, spec: str, config: dict, config_sha: str, counts: dict, errors) -> object:
    """Check (or create) the output directory for this job; returns the held lock."""
    if out.exists() and not out.is_dir():
        raise writer.JobError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / writer.DATA).mkdir(exist_ok=True)
    lock = writer.OutputLock(out, rank)
    lock.__enter__()
    try:
        manifest = writer.read_manifest(out)
        if manifest is None:
            foreign = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in _OURS]
            if foreign or any((out / writer.DATA).glob("*.parquet")):
                raise writer.JobError(f"--out {out} holds files that are not from a gim-fast job "
                                      f"({', '.join(sorted(foreign)[:5]) or 'shards without a manifest'}); "
                                      "choose a new or empty directory")
            if rank == 0:
                manifest = writer.create_manifest(out, {"model": spec, **config}, config_sha, counts)
        if manifest is not None:
            _check_same_job(out, manifest, spec, config)
        if rank == 0:
            writer.remove_stale_tmp(out)
            writer.write_errors(out, errors)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return lock


def _check_same_job(out: Path, manifest: dict, spec: str, config: dict) -> None:
    # How the model and the input were named is informational: the same weights in another folder, or the same
    # bytes under another file name, resume; other weights or other bytes do not.
    old = dict(manifest.get("config", {}))
    old_spec, old_input = old.pop("model", None), old.pop("input", None)
    new = {k: v for k, v in config.items() if k != "input"}
    diffs = writer.compare_configs(old, new)
    if diffs:
        if any(d.startswith(("model_digest", "model_class")) for d in diffs):
            diffs.insert(0, f"model: {old_spec!r} → {spec!r}")
        if any(d.startswith("input_sha256") for d in diffs):
            diffs.insert(0, f"input: {old_input!r} → {config.get('input')!r} (other contents)")
        raise writer.JobError(
            f"{out} holds a job with other settings, so this command cannot resume it: " + "; ".join(diffs)
            + ". Run the original command to finish it, or choose a new --out directory (or delete this one).")


def _compute_all(model, todo: list[Batch], baseline, settings, device, tokenizer, out, rank, world, config_sha,
                 shard_rows, flush_seconds, progress, run) -> Iterator[RowResult]:
    from tqdm.auto import tqdm

    decode = _Decoder(tokenizer)
    total_tokens = sum(b.tokens for b in todo)
    total_rows = sum(len(b.rows) for b in todo)
    disable = (not progress) if progress is not None else None
    desc = f"rank {rank}/{world}" if world > 1 else "attributing"
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, disable=disable, position=rank,
               dynamic_ncols=True, smoothing=0.1, leave=True)
    pending: list[RowResult] = []
    pending_batches: list[int] = []
    last_flush = time.perf_counter()
    rows_done = 0
    try:
        for batch in todo:
            results = _compute(model, batch, baseline, settings, device, decode)
            writer._crash_point("batch")
            rows_done += len(results)
            bar.update(batch.tokens)
            elapsed = bar.format_dict.get("elapsed") or 0.0      # the bar itself shows tokens/s and the ETA
            bar.set_postfix_str(f"rows {rows_done}/{total_rows}, {rows_done / elapsed if elapsed else 0:.1f} rows/s",
                                refresh=False)
            if out is not None:
                pending.extend(results)
                pending_batches.append(batch.index)
                if len(pending) >= shard_rows or time.perf_counter() - last_flush >= flush_seconds:
                    writer.write_shard(out, pending_batches, pending, rank=rank, config_sha256=config_sha)
                    pending, pending_batches, last_flush = [], [], time.perf_counter()
            yield from results
        if pending:
            writer.write_shard(out, pending_batches, pending, rank=rank, config_sha256=config_sha)
    finally:
        bar.close()


def _finish(out: Path, plan: list[Batch], html_report: int, group: bool, rank: int, special_ids=()) -> dict | None:
    """Mark the job complete when every batch is in a shard. With a process group, every rank waits until all
    shards are written and rank 0 alone completes the manifest (two ranks rewriting it at once would race);
    separate processes without a group each try, and whichever gets there last completes it."""
    if not group:
        manifest = _try_finalize(out, plan, html_report, special_ids)
        return manifest if manifest is not None else writer.read_manifest(out)
    import torch.distributed as dist

    dist.barrier()                  # every rank's shards are on disk
    manifest = _try_finalize(out, plan, html_report, special_ids) if rank == 0 else None
    dist.barrier()                  # the manifest is complete before any rank reports
    return manifest if manifest is not None else writer.read_manifest(out)


def _try_finalize(out: Path, plan: list[Batch], html_report: int, special_ids=()) -> dict | None:
    manifest = writer.read_manifest(out)
    if manifest is None:       # rank 0 has not written it yet: it will finish the job itself
        return None
    report = None
    if html_report:
        done = writer.done_batches(out, manifest["config_sha256"])
        if len(done) >= len(plan):
            report = _write_report(out, html_report, manifest, special_ids)
    return writer.finalize_manifest(out, manifest, planned_batches=len(plan), report=report)


def _write_report(out: Path, n: int, manifest: dict, special_ids=()) -> str:
    from ..display import plural
    from ..html import rows_from_table, write_html

    lines = writer.read_results(out, columns=["line"])
    if lines is None or len(lines) == 0:
        rows = []
    else:
        cutoff = lines["line"][min(n, len(lines)) - 1].as_py()
        table = writer.read_results(out, filters=[("line", "<=", cutoff)])
        rows = rows_from_table(table.slice(0, n), special_ids)
    config = manifest["config"]
    write_html(out / writer.REPORT, rows, title=f"GIM attributions: {config.get('model')}",
               subtitle=f"first {plural(len(rows), 'row')} of {config.get('input')}")
    return writer.REPORT


def iter_error_lines(errors: Iterable[RowError]) -> Iterator[str]:
    for e in errors:
        yield f"line {e.line}: {e.reason}"
