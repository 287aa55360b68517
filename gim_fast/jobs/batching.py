"""From raw rows to batches: tokenization, per-row checks, grouping by length under a token budget, ranks.

The plan is a pure function of the rows and the settings, so a resumed job (or another rank) rebuilds exactly
the same batches, and every batch is computed with exactly the same neighbours as in an uninterrupted run.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .inputs import RawRow, RowError

__all__ = ["Row", "Batch", "TargetResolver", "tokenize_rows", "pack", "assign_ranks"]


@dataclass(frozen=True)
class Row:
    """A row ready to attribute: its token ids and, when the data gives one, its target token id or its answer
    (token ids, attributed after the text)."""

    line: int
    id: str
    text: str
    token_ids: tuple[int, ...]
    target_id: int | None
    answer_ids: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """The tokens the model reads: the text's, and the answer's."""
        return len(self.token_ids) + len(self.answer_ids or ())


@dataclass(frozen=True)
class Batch:
    """Rows attributed together, padded to the longest (``length``); ``index`` is its place in the plan."""

    index: int
    rows: tuple[Row, ...]
    length: int          # the longest row's size (text + answer)

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * self.length

    @property
    def tokens(self) -> int:
        return sum(r.size for r in self.rows)


class TargetResolver:
    """A target as given in the data (token string or id) → a token id, or the reason it is not one.

    ``kind``: ``"auto"`` (an int, or a string of digits, is an id; any other string must be one token),
    ``"id"`` or ``"token"`` (a string is always a token, even "42").
    """

    def __init__(self, tokenizer, vocab_size: int, kind: str = "auto"):
        if kind not in ("auto", "id", "token"):
            raise ValueError(f"target kind must be 'auto', 'id' or 'token', got {kind!r}")
        self.tokenizer, self.vocab_size, self.kind = tokenizer, vocab_size, kind
        self._cache: dict = {}

    def __call__(self, target) -> int | str:
        """The id, or a str saying why the target is not usable."""
        key = (type(target), target)
        if key not in self._cache:
            self._cache[key] = self._resolve(target)
        return self._cache[key]

    def _resolve(self, target) -> int | str:
        as_id = None
        if isinstance(target, int):
            if self.kind == "token":
                return f"target {target!r} is a number, but targets are token strings (--target-type token)"
            as_id = target
        elif self.kind == "id" or (self.kind == "auto" and target.strip().lstrip("-").isdigit()
                                   and target == target.strip()):
            try:
                as_id = int(target)
            except ValueError:
                return f"target {target!r} is not an integer token id (--target-type id)"
        if as_id is not None:
            if not 0 <= as_id < self.vocab_size:
                return f"target id {as_id} is outside the vocabulary [0, {self.vocab_size})"
            return as_id
        ids = self.tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            pieces = ", ".join(repr(self.tokenizer.decode([i])) for i in ids[:8]) or "nothing"
            return (f"unknown target token {target!r}: it is not one token of the vocabulary but tokenizes to "
                    f"{len(ids)} ({pieces})")
        if not 0 <= ids[0] < self.vocab_size:
            return f"target {target!r} is token id {ids[0]}, outside the model's output vocabulary [0, {self.vocab_size})"
        return int(ids[0])


def tokenize_rows(raw: Iterable[RawRow | RowError], tokenizer, *, max_length: int | None, vocab_size: int,
                  targets: TargetResolver, chunk: int = 1024, extra_tokens: int = 0) -> Iterable[Row | RowError]:
    """Rows with token ids (tokenized in chunks with the tokenizer's own defaults; an answer alone, without
    special tokens), checked one by one. ``extra_tokens`` (the tokens a generated answer may add) count towards
    ``max_length``."""
    pending: list[RawRow | RowError] = []

    def flush():
        texts = [r.text for r in pending if isinstance(r, RawRow)]
        encoded = iter(tokenizer(texts)["input_ids"]) if texts else iter(())
        answers = [r.answer for r in pending if isinstance(r, RawRow) and r.answer is not None]
        encoded_answers = iter(tokenizer(answers, add_special_tokens=False)["input_ids"]) if answers else iter(())
        for r in pending:
            if isinstance(r, RowError):
                yield r
                continue
            ids = tuple(int(i) for i in next(encoded))
            answer = None if r.answer is None else tuple(int(i) for i in next(encoded_answers))
            size = len(ids) + len(answer or ()) + extra_tokens
            if not ids:
                yield RowError(r.line, r.id, "empty after tokenization (no tokens)", r.text)
            elif answer is not None and not answer:
                yield RowError(r.line, r.id, "the answer is empty after tokenization (no tokens)", r.text)
            elif max_length is not None and size > max_length:
                what = f"{len(ids)} tokens" + (f" + an answer of {len(answer)}" if answer else "") + (
                    f" + {extra_tokens} to generate" if extra_tokens else "")
                yield RowError(r.line, r.id, f"too long: {what}, more than --max-length {max_length}", r.text)
            elif any(not 0 <= i < vocab_size for i in ids + (answer or ())):
                bad = [i for i in ids + (answer or ()) if not 0 <= i < vocab_size][:5]
                yield RowError(r.line, r.id, f"token ids {bad} outside the model's vocabulary [0, {vocab_size})",
                               r.text)
            elif r.target is None:
                yield Row(r.line, r.id, r.text, ids, None, answer)
            else:
                target = targets(r.target)
                if isinstance(target, str):
                    yield RowError(r.line, r.id, target, r.text)
                else:
                    yield Row(r.line, r.id, r.text, ids, target)
        pending.clear()

    for r in raw:
        pending.append(r)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def pack(rows: list[Row], *, batch_tokens: int, batch_size: int | None = None) -> list[Batch]:
    """Group rows of similar length into batches of at most ``batch_tokens`` padded tokens (and ``batch_size``
    rows). A row longer than the budget gets a batch of its own. Rows that name their target and rows that
    explain the top prediction are never mixed (the engine takes one or the other per batch).

    Batches come longest first, so a budget too large for the device fails on the first batch, not hours in.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    ordered = sorted(rows, key=lambda r: (r.target_id is None, -r.size, r.line))
    groups: list[list[Row]] = []
    current: list[Row] = []
    for row in ordered:
        if current:
            length = current[0].size   # the first row is the longest: sorted descending
            same_kind = (current[0].target_id is None) == (row.target_id is None)
            fits = (len(current) + 1) * length <= batch_tokens and (batch_size is None or len(current) < batch_size)
            if not (same_kind and fits):
                groups.append(current)
                current = []
        current.append(row)
    if current:
        groups.append(current)
    groups.sort(key=lambda g: -g[0].size)   # stable: ties keep their order
    return [Batch(i, tuple(g), g[0].size) for i, g in enumerate(groups)]


def assign_ranks(batches: list[Batch], world_size: int) -> list[int]:
    """The rank that computes each batch: longest-processing-time-first over padded tokens, deterministic.

    The assignment depends on the whole plan only (not on what is already done), so every rank computes it
    alone, without talking to the others.
    """
    load = [0] * world_size
    owner = []
    for batch in batches:                       # already longest first
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += batch.padded_tokens
        owner.append(rank)
    return owner
