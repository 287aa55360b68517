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
import datetime
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
import torch.distributed as dist
from tqdm.auto import tqdm

from ..answers import explain_answer_with
from ..backends import resolve_backend
from ..context import generate_answers
from ..display import plural
from ..engine import attribute
from ..explain import resolve_baseline
from ..chat import has_chat_template, special_token_ids
from ..html import answer_views_from_table, rows_from_table, write_answer_html, write_html
from ..integration import check_model
from .. import models
from ..outputs import check_output_dir
from ..settings import TARGETS, GIMSettings
from . import writer
from .batching import Batch, Row, TargetResolver, assign_ranks, pack, tokenize_rows
from .inputs import InputError, RowError, check_input, detect_format, fingerprint, read_rows

__all__ = ["attribute_dataset", "DatasetRun", "RowResult", "AnswerRowResult", "BadRowError", "DEFAULT_BATCH_TOKENS"]

log = logging.getLogger(__name__)
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
    template: list[bool] | None = None    # with --chat: True at the chat template's tokens (score 0)


@dataclass
class AnswerRowResult:
    """The attribution of one input row's answer (``answer_field`` or ``generate``): the columns of the shards."""

    id: str
    line: int
    text: str
    token_ids: list[int]      # the text's tokens (P)
    tokens: list[str]
    answer: str               # the answer's text (tokenizer.decode of answer_ids)
    answer_ids: list[int]     # its tokens (M)
    answer_tokens: list[str]
    answer_given: bool        # True when the data gave the answer; False when it was generated
    scores: np.ndarray        # float32 [M, P + M]: row m attributes answer token m over text and answer tokens
    answer_logits: np.ndarray     # float32 [M]: each answer token's raw logit
    answer_logprobs: np.ndarray   # float32 [M]: its log-probability
    template: list[bool] | None = None    # with --chat: True at the chat template's tokens of the text (score 0)


# ------------------------------------------------------------------------------------------ ranks/devices


def _rank_and_world() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) from torch.distributed or the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world > 1 and dist.is_available() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
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
        row_scores = scores[i, length - n:].copy()
        if row.template is not None:          # the chat template's tokens are held fixed: not scored
            row_scores[np.asarray(row.template, dtype=bool)] = 0.0
        out.append(RowResult(
            id=row.id, line=row.line, text=row.text, token_ids=list(row.token_ids),
            tokens=[decode(t) for t in row.token_ids], scores=row_scores,
            target_id=int(target_ids[i]), target=decode(int(target_ids[i])), target_logit=float(logits[i]),
            target_position=n - 1, target_given=given,
            template=None if row.template is None else list(row.template)))
    return out


def _compute_answers(model, batch: Batch, baseline: int, settings: GIMSettings, device, decode: _Decoder,
                     tokenizer, answer: AnswerMode) -> list[AnswerRowResult]:
    """One ``explain_answer`` call for the batch: texts left-padded, answers right-padded (generated first, greedily,
    when the data gives none)."""
    rows = batch.rows
    given = rows[0].answer_ids is not None
    if given:
        answers = [list(r.answer_ids) for r in rows]
    else:
        answers = generate_answers(model, tokenizer, [r.token_ids for r in rows], answer.generate)
    keep = [i for i, a in enumerate(answers) if a]
    # a generation that is only the end-of-sequence token leaves nothing to attribute: a row with an empty answer
    out = [AnswerRowResult(r.id, r.line, r.text, list(r.token_ids), [decode(t) for t in r.token_ids], "", [], [],
                           given, np.zeros((0, len(r.token_ids)), np.float32), np.zeros(0, np.float32),
                           np.zeros(0, np.float32), None if r.template is None else list(r.template))
           for r in rows]
    if keep:
        length = max(len(rows[i].token_ids) for i in keep)
        count = max(len(answers[i]) for i in keep)
        ids = torch.full((len(keep), length), baseline, dtype=torch.long)
        mask = torch.zeros((len(keep), length), dtype=torch.long)
        answer_ids = torch.full((len(keep), count), baseline, dtype=torch.long)
        answer_mask = torch.zeros((len(keep), count), dtype=torch.long)
        for r, i in enumerate(keep):
            n, m = len(rows[i].token_ids), len(answers[i])
            ids[r, length - n:], mask[r, length - n:] = torch.tensor(rows[i].token_ids), 1
            answer_ids[r, :m], answer_mask[r, :m] = torch.tensor(answers[i]), 1
        with torch.enable_grad():
            result = explain_answer_with(model, ids.to(device), answer_ids.to(device), settings,
                                         attention_mask=mask.to(device), answer_mask=answer_mask.to(device),
                                         baseline_token_id=baseline, target=answer.target)
        scores = result.scores.float().cpu().numpy()                    # [B, count, length + count]
        logits = result.target_logits.float().cpu().numpy()
        logprobs = result.target_logprobs.float().cpu().numpy()
        for r, i in enumerate(keep):
            row, a = rows[i], answers[i]
            n, m = len(row.token_ids), len(a)
            columns = np.r_[length - n:length, length:length + m]           # the row's text, then its answer
            row_scores = scores[r, :m][:, columns].copy()
            if row.template is not None:      # the chat template's tokens are held fixed: not scored
                row_scores[:, :n][:, np.asarray(row.template, dtype=bool)] = 0.0
            out[i] = AnswerRowResult(
                id=row.id, line=row.line, text=row.text, token_ids=list(row.token_ids),
                tokens=[decode(t) for t in row.token_ids], answer=tokenizer.decode(a), answer_ids=list(a),
                answer_tokens=[decode(t) for t in a], answer_given=given,
                scores=row_scores, answer_logits=logits[r, :m].copy(),
                answer_logprobs=logprobs[r, :m].copy(),
                template=None if row.template is None else list(row.template))
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
                      settings: GIMSettings | None = None, baseline_token=None, dtype=torch.float32, device=None,
                      cache_dir=None, shard_rows: int = DEFAULT_SHARD_ROWS,
                      flush_seconds: float = DEFAULT_FLUSH_SECONDS, html_report: int = 0,
                      progress: bool | None = False, answer_field: str | None = None, generate: int | None = None,
                      answer_target: str = "logit", chat: bool = False, **gim_settings) -> DatasetRun:
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
        settings, **gim_settings: the GIM settings, as one :class:`~gim_fast.settings.GIMSettings` or as its
            fields by name (the keywords of :func:`gim_fast.explain`); default GIM's. ``baseline_token``: an id
            or a one-token string (default as in ``explain``).
        dtype, device, cache_dir: how a model given by name is loaded (device default: this rank's GPU, else CPU).
        shard_rows, flush_seconds: a shard is written after this many rows, or this many seconds of work.
        html_report: with ``out``, write ``report.html`` with the first N rows (by input line) at the end.
        progress: a tqdm bar (rows/s, tokens/s, ETA) on stderr; ``None``: when stderr is a terminal.
        answer_field, generate: attribute an answer after each row's text instead of its next token, with
            ``gim_fast.explain_answer``: the answer in column ``answer_field`` (tokenized alone, without special
            tokens), or the model's own greedy continuation of at most ``generate`` tokens (cut before the
            end-of-sequence token). Results are :class:`AnswerRowResult`: ``scores`` ``[M, P + M]``, every answer
            token over the text's and the answer's tokens. ``answer_target``: ``"logit"`` or ``"logprob"``.

    ``chat``: each row's text is the user's message, put in the tokenizer's chat template with the generation
    prompt (a model without a template is refused); only the message's tokens are scored: the template's get 0
    and a ``template`` column (list<bool>) marks them.

    Under ``torchrun``/``accelerate launch`` (or an initialised ``torch.distributed``) every process plans the
    same batches and computes its own share; results come out in batch order (longest rows first), not input
    order: sort by ``line`` to restore it.
    """
    if settings is None:
        settings = GIMSettings(**gim_settings)
    elif gim_settings:
        raise TypeError(f"give the GIM settings as settings=GIMSettings(...) or by name, not both (got "
                        f"{', '.join(sorted(gim_settings))} beside settings)")
    elif not isinstance(settings, GIMSettings):
        raise TypeError(f"settings must be a gim_fast.GIMSettings, got {type(settings).__name__}")
    job = JobConfig(
        data=data, model=model, tokenizer=tokenizer, settings=settings, baseline_token=baseline_token,
        source=SourceOptions(format, text_field, target_field, id_field, target_type),
        batching=BatchOptions(batch_tokens, batch_size, max_length),
        loading=LoadOptions(dtype, device, cache_dir),
        output=OutputOptions(out, shard_rows, flush_seconds, html_report, strict, progress),
        answer=_answer_mode(answer_field, generate, answer_target, target_field), chat=chat)
    job.check()
    return DatasetRun(lambda run: _run(run, job))


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class SourceOptions:
    """Where the rows come from: the input format and the columns to read."""

    format: str | None = None
    text_field: str = "text"
    target_field: str | None = None
    id_field: str | None = None
    target_type: str = "auto"


@dataclass(frozen=True)
class BatchOptions:
    """How rows are grouped: a padded-token budget per batch, an optional row cap, the longest row accepted."""

    batch_tokens: int = DEFAULT_BATCH_TOKENS
    batch_size: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class LoadOptions:
    """How a model given by name is loaded, and where it runs."""

    dtype: torch.dtype = torch.float32
    device: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class OutputOptions:
    """Where and how results are written (``out=None``: results are only yielded)."""

    out: str | os.PathLike | None = None
    shard_rows: int = DEFAULT_SHARD_ROWS
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    html_report: int = 0
    strict: bool = False
    progress: bool | None = False


@dataclass(frozen=True)
class AnswerMode:
    """Attribute an answer after each row instead of its next token: from the column ``field``, or generated
    (at most ``generate`` tokens); ``target``: each answer token's ``"logit"`` or ``"logprob"``."""

    field: str | None
    generate: int | None
    target: str


@dataclass(frozen=True)
class JobConfig:
    """Everything one dataset job was asked to do (what :func:`attribute_dataset` was given, grouped)."""

    data: object
    model: object
    tokenizer: object
    settings: GIMSettings
    baseline_token: object
    source: SourceOptions
    batching: BatchOptions
    loading: LoadOptions
    output: OutputOptions
    answer: AnswerMode | None
    chat: bool = False

    def check(self) -> None:
        """Everything that can be checked without the model, before a model is loaded."""
        for name, value, low in (("batch_tokens", self.batching.batch_tokens, 1),
                                 ("shard_rows", self.output.shard_rows, 1),
                                 ("html_report", self.output.html_report, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("batch_size", self.batching.batch_size), ("max_length", self.batching.max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.source.target_type not in ("auto", "token", "id"):
            raise ValueError(f"target_type must be 'auto', 'token' or 'id', got {self.source.target_type!r}")
        if isinstance(self.data, (str, os.PathLike)):
            src = self.source
            check_input(self.data, format=src.format, text_field=src.text_field, target_field=src.target_field,
                        id_field=src.id_field, answer_field=self.answer and self.answer.field)
        if self.output.out is not None:
            check_output_dir(self.output.out)
        device = self.loading.device
        if device not in (None, "auto"):
            _check_device(device)
        baseline = self.baseline_token
        if isinstance(baseline, (int, str)) and str(baseline).strip().startswith("-") \
                and str(baseline).strip()[1:].isdigit():
            raise InputError(f"baseline token id {baseline} is negative; a token id is >= 0")
        if isinstance(self.model, (str, os.PathLike)):
            models.check_model_name(self.model, cache_dir=self.loading.cache_dir)
            resolve_backend(self.settings.backend, _device(device, 0, 1), self.loading.dtype)


def _answer_mode(answer_field, generate, answer_target, target_field) -> AnswerMode | None:
    """The answer settings, None for next-token attribution; a clear error for a combination that cannot be."""
    if answer_target not in TARGETS:
        raise ValueError(f"answer_target must be 'logit' or 'logprob', got {answer_target!r}")
    if generate is not None and (isinstance(generate, bool) or not isinstance(generate, int) or generate < 1):
        raise ValueError(f"generate must be a positive integer (the most tokens to generate) or None, got {generate!r}")
    if answer_field is not None and not (isinstance(answer_field, str) and answer_field):
        raise ValueError(f"answer_field must be a column name or None, got {answer_field!r}")
    if answer_field is None and generate is None:
        if answer_target != "logit":
            raise ValueError("answer_target applies to answers: give answer_field or generate too")
        return None
    if answer_field is not None and generate is not None:
        raise ValueError("give answer_field (answers from the data) or generate (answers from the model), not both")
    if target_field is not None:
        raise ValueError("target_field explains one next token; answer_field/generate explain a whole answer: "
                         "give one or the other")
    return AnswerMode(answer_field, generate, answer_target)


@dataclass
class _Loaded:
    """The model the job runs, its tokenizer, how it was named, and its device."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    device: torch.device


def _load(job: JobConfig, rank: int, world: int) -> _Loaded:
    """The model on its device. A loaded model stays where it is unless a device is given."""
    model, tokenizer, device = job.model, job.tokenizer, job.loading.device
    if isinstance(model, (str, os.PathLike)):
        spec = os.fspath(model)
        model, tokenizer = models.load_pretrained(spec, cache_dir=job.loading.cache_dir, dtype=job.loading.dtype)
        device = _device(device, rank, world)
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: attribute_dataset(..., tokenizer=tokenizer)")
        spec = getattr(model, "name_or_path", None) or type(model).__name__
        device = _device(device, rank, world) if device is not None else next(model.parameters()).device
    return _Loaded(model.to(device), tokenizer, spec, device)


@dataclass
class _Plan:
    """The job's plan, the same in every process: the good rows batched, each batch's rank, the bad rows."""

    source: dict              # the input as the manifest records it (path, digest, format)
    batches: list[Batch]
    owners: list[int]         # the rank computing each batch
    errors: list[RowError]
    input_rows: int
    baseline: int
    max_length: int | None


def _plan(job: JobConfig, loaded: _Loaded, world: int) -> _Plan:
    """Read and tokenize every row, set bad rows aside, group the good ones into batches, give each a rank."""
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab_in = model.get_input_embeddings().num_embeddings
    max_length = job.batching.max_length
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    baseline = _baseline(job.baseline_token, tokenizer, vocab_in)
    src, answer_field = job.source, job.answer and job.answer.field
    if isinstance(job.data, (str, os.PathLike)):
        source = {"input": os.path.abspath(job.data), "input_sha256": fingerprint(job.data),
                  "format": detect_format(job.data, src.format)}
        raw = read_rows(job.data, format=src.format, text_field=src.text_field, target_field=src.target_field,
                        id_field=src.id_field, answer_field=answer_field)
    else:
        records = list(job.data)
        source = {"input": "<python objects>", "input_sha256": _records_fingerprint(records), "format": None}
        raw = read_rows(records, text_field=src.text_field, target_field=src.target_field, id_field=src.id_field,
                        answer_field=answer_field)
    resolver = TargetResolver(tokenizer, _vocab_out(model), src.target_type)
    rows: list[Row] = []
    errors: list[RowError] = []
    input_rows = 0
    extra = (job.answer.generate if job.answer else None) or 0
    if job.chat and not has_chat_template(tokenizer):
        raise InputError("--chat: this model's tokenizer has no chat template (a base model, not an instruct one); "
                         "leave out --chat and give the texts as the model should read them")
    for item in tokenize_rows(raw, tokenizer, max_length=max_length, vocab_size=vocab_in, targets=resolver,
                              extra_tokens=extra, chat=job.chat):
        input_rows += 1
        if isinstance(item, RowError):
            if job.output.strict:
                raise BadRowError(item)
            errors.append(item)
        else:
            rows.append(item)
    batches = pack(rows, batch_tokens=job.batching.batch_tokens, batch_size=job.batching.batch_size)
    return _Plan(source, batches, assign_ranks(batches, world), errors, input_rows, baseline, max_length)


def _job_identity(job: JobConfig, loaded: _Loaded, plan: _Plan) -> tuple[dict, str]:
    """The manifest's ``config`` and its digest: what the results depend on (not where the input file lies),
    which shards carry and a resumed job compares."""
    src = job.source
    config = {
        **plan.source, "text_field": src.text_field, "target_field": src.target_field, "id_field": src.id_field,
        "target_type": src.target_type, **_model_identity(loaded.model),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device_type": loaded.device.type, **job.settings.as_dict(), "baseline_token_id": plan.baseline,
        "batch_tokens": job.batching.batch_tokens, "batch_size": job.batching.batch_size,
        "max_length": plan.max_length,
    }
    if job.chat:                     # only then, for the same reason
        config["chat"] = True
    if job.answer is not None:       # only then: a next-token job's settings (and resumes) stay as they were
        config.update({"answer_field": job.answer.field, "generate": job.answer.generate,
                       "answer_target": job.answer.target})
    identity = {k: v for k, v in config.items() if k != "input"}
    return config, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _run(run: DatasetRun, job: JobConfig):
    """The job in this process: load, plan, prepare the output directory, compute this rank's missing batches
    (yielding their rows), complete the manifest, summarise."""
    started = time.perf_counter()
    rank, world, own_group = _rank_and_world()
    try:
        run.rank, run.world_size = rank, world
        loaded = _load(job, rank, world)
        check_model(loaded.model)
        plan = _plan(job, loaded, world)
        run.errors, run.plan = plan.errors, plan.batches
        config, config_sha = _job_identity(job, loaded, plan)
        counts = {"input_rows": plan.input_rows, "errors": len(plan.errors), "batches": len(plan.batches)}

        out = None if job.output.out is None else Path(job.output.out)
        done: dict[int, Path] = {}
        lock = contextlib.nullcontext()
        if out is not None:
            run.out = out
            lock = _prepare_out(out, rank, loaded.spec, config, config_sha, counts, plan.errors)
        with lock:
            if out is not None:
                done = writer.done_batches(out, config_sha)
            mine = [b for b, owner in zip(plan.batches, plan.owners) if owner == rank]
            todo = [b for b in mine if b.index not in done]
            compute_started = time.perf_counter()
            yield from _compute_all(loaded, todo, plan.baseline, job, out, rank, world, config_sha, run)
            manifest = None
            if out is not None:
                special = special_token_ids(loaded.tokenizer)
                manifest = _finish(out, plan.batches, job.output.html_report, own_group or _group_active(), rank,
                                   special)
            run.manifest = manifest
            run.summary = _summary(plan, todo, len(mine) - len(todo), rank, world, out, manifest, started,
                                   compute_started)
    finally:
        if own_group:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _summary(plan: _Plan, todo: list[Batch], already_done: int, rank: int, world: int, out: Path | None,
             manifest: dict | None, started: float, compute_started: float) -> dict:
    """What this process did: rows, tokens, batches, time, speed."""
    elapsed = time.perf_counter() - compute_started
    computed = sum(len(b.rows) for b in todo)
    computed_tokens = sum(b.tokens for b in todo)
    return {
        "rank": rank, "world_size": world, "input_rows": plan.input_rows, "rows": computed,
        "tokens": computed_tokens, "padded_tokens": sum(b.padded_tokens for b in todo),
        "errors": len(plan.errors), "batches": len(todo), "already_done_batches": already_done,
        "seconds": elapsed, "setup_seconds": compute_started - started,
        "rows_per_s": computed / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": computed_tokens / elapsed if elapsed > 0 else 0.0,
        "out": None if out is None else str(out), "complete": bool(manifest and manifest["status"] == "complete"),
    }


def _group_active() -> bool:
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


def _compute_all(loaded: _Loaded, todo: list[Batch], baseline: int, job: JobConfig, out: Path | None, rank: int,
                 world: int, config_sha: str, run: DatasetRun) -> Iterator[RowResult]:
    """Compute ``todo`` batch by batch, yield their rows, and write them as shards (every ``shard_rows`` rows or
    ``flush_seconds`` seconds) when there is an output directory."""
    model, tokenizer, device, settings = loaded.model, loaded.tokenizer, loaded.device, job.settings
    answer, progress = job.answer, job.output.progress
    shard_rows, flush_seconds = job.output.shard_rows, job.output.flush_seconds
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
            if answer is None:
                results = _compute(model, batch, baseline, settings, device, decode)
            else:
                results = _compute_answers(model, batch, baseline, settings, device, decode, tokenizer, answer)
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
    lines = writer.read_results(out, columns=["line"])
    table = None
    if lines is not None and len(lines):
        cutoff = lines["line"][min(n, len(lines)) - 1].as_py()
        table = writer.read_results(out, filters=[("line", "<=", cutoff)]).slice(0, n)
    config = manifest["config"]
    title = f"GIM attributions: {config.get('model')}"
    if "answer_target" in config:        # an answer job
        views = [] if table is None else answer_views_from_table(table, special_ids)
        write_answer_html(out / writer.REPORT, views, title=title,
                          subtitle=f"first {plural(len(views), 'row')} of {config.get('input')}; each answer "
                                   f"token's {config['answer_target']}")
    else:
        rows = [] if table is None else rows_from_table(table, special_ids)
        write_html(out / writer.REPORT, rows, title=title,
                   subtitle=f"first {plural(len(rows), 'row')} of {config.get('input')}")
    return writer.REPORT


def iter_error_lines(errors: Iterable[RowError]) -> Iterator[str]:
    for e in errors:
        yield f"line {e.line}: {e.reason}"
