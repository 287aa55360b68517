"""From raw rows to batches: tokenization, per-row checks, grouping by length under a token budget, ranks.

The plan is a pure function of the rows and the settings, so a resumed job (or another rank) rebuilds exactly
the same batches, and every batch is computed with exactly the same neighbours as in an uninterrupted run.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..chat import chat_prompt
from .inputs import RawRow, RowError

__all__ = ["Row", "Batch", "TargetResolver", "max_chars_per_token", "tokenize_rows", "pack", "assign_ranks"]


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
    template: tuple[bool, ...] | None = None   # with a chat template: True at the template's tokens (not scored)

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


# Tokenizer pipeline steps (``tokenizers`` JSON type names) after which the text has at least as many units (characters,
# or bytes for byte-level models) as the input has characters: none of them drops or merges characters.
_KEEP_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD", "ByteLevel"}   # + "Replace" of a string by a longer one
_KEEP_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}  # + "Split"/"Punctuation" unless "Removed"


def _steps(step: dict | None, sequence_key: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer (its JSON form), sequences flattened."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step.get(sequence_key, ()) for s in _steps(inner, sequence_key)]
    return [step]


def _keeps_characters(step: dict, kept: set[str]) -> bool:
    kind = step.get("type")
    if kind == "Replace":
        pattern = step.get("pattern", {})
        return "String" in pattern and len(step.get("content", "")) >= len(pattern["String"]) > 0
    if kind in ("Split", "Punctuation"):
        return step.get("behavior", "Isolated") != "Removed"
    return kind in kept


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def max_chars_per_token(tokenizer) -> int | None:
    """L such that no token stands for more than L characters of the input text, or None when that cannot be known.

    Then a text of more than ``max_length × L`` characters has more than ``max_length`` tokens, and is rejected
    without being tokenized (a 100 MB line would take minutes and many GB). L is the longest vocabulary entry (in
    characters; for byte-level models in bytes, which is at least the characters); markers such as ``##`` or
    ``<0x41>`` only make it larger, which is safe. The bound holds only when no step of the tokenizer drops or merges
    characters, which is checked on its pipeline: a ``tokenizers`` (fast) tokenizer whose normalizer, pre-tokenizer
    and model keep every character (e.g. byte-level BPE as in Llama 3/SmolLM2/GPT-2, or SentencePiece-style BPE with
    byte fallback as in Gemma/Llama 2), and whose added tokens do not swallow the whitespace around them. Anything
    else (whitespace-collapsing or Unicode-composing normalizers, WordPiece/WordLevel, fused unknown tokens, slow
    tokenizers) returns None, and rows are then tokenized whole.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        normalizers = _steps(_state(backend.normalizer), "normalizers")
        pre_tokenizers = _steps(_state(backend.pre_tokenizer), "pretokenizers")
    except (AttributeError, TypeError, ValueError):
        return None
    if not (all(_keeps_characters(s, _KEEP_NORMALIZERS) for s in normalizers)
            and all(_keeps_characters(s, _KEEP_PRE_TOKENIZERS) for s in pre_tokenizers)):
        return None
    model = backend.model
    kind = type(model).__name__
    byte_level = any(s.get("type") == "ByteLevel" for s in normalizers + pre_tokenizers)
    if kind == "BPE":
        # an unknown character is dropped (no unk token) or merged with its neighbours (fuse_unk), unless every
        # byte has a token (byte-level alphabet, or byte fallback)
        if not (byte_level or model.byte_fallback or (model.unk_token is not None and not model.fuse_unk)):
            return None
    elif kind == "Unigram":
        if not getattr(model, "byte_fallback", False):   # unknown characters are fused into one unk token
            return None
    else:                                                # WordPiece/WordLevel: a whole unknown word is one token
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) for t in added.values()):
        return None
    return max(map(len, tokenizer.get_vocab()), default=0) or None


def tokenize_rows(raw: Iterable[RawRow | RowError], tokenizer, *, max_length: int | None, vocab_size: int,
                  targets: TargetResolver, chunk: int = 1024, extra_tokens: int = 0,
                  chat: bool = False) -> Iterable[Row | RowError]:
    """Rows with token ids (tokenized in chunks with the tokenizer's own defaults; an answer alone, without
    special tokens), checked one by one. ``extra_tokens`` (the tokens a generated answer may add) count towards
    ``max_length``.

    A row longer than ``max_length`` tokens is a RowError; when :func:`max_chars_per_token` gives a bound, a row
    with more characters than ``max_length`` tokens can hold is one without being tokenized (bounded time and
    memory, exact: a row it rejects has more than ``max_length`` tokens). ``chat``: each text is the user's message,
    put in the tokenizer's chat template (``gim_fast.chat.chat_prompt``); the rows record the template's tokens."""
    pending: list[RawRow | RowError] = []
    per_token = max_chars_per_token(tokenizer) if max_length is not None else None
    max_chars = None if per_token is None else max_length * per_token

    def too_long(r: RawRow) -> RowError:
        return RowError(r.line, r.id, f"too long: {len(r.text)} characters, more than the {max_chars} that "
                                      f"--max-length {max_length} tokens can hold (no token of this tokenizer "
                                      f"stands for more than {per_token} characters)", r.text)

    def flush():
        texts = [r.text for r in pending if isinstance(r, RawRow)]
        templates = iter(())
        if chat:                      # one chat prompt per text: its ids and which tokens are the template's
            prompts = [_chat_or_error(tokenizer, t) for t in texts]
            encoded = iter([p if isinstance(p, str) else p.input_ids for p in prompts])
            templates = iter([None if isinstance(p, str) else tuple(p.template) for p in prompts])
        else:
            encoded = iter(tokenizer(texts)["input_ids"]) if texts else iter(())
        answers = [r.answer for r in pending if isinstance(r, RawRow) and r.answer is not None]
        encoded_answers = iter(tokenizer(answers, add_special_tokens=False)["input_ids"]) if answers else iter(())
        for r in pending:
            if isinstance(r, RowError):
                yield r
                continue
            ids = next(encoded)
            template = next(templates, None)
            answer = None if r.answer is None else tuple(int(i) for i in next(encoded_answers))
            if isinstance(ids, str):          # the chat template refused the text
                yield RowError(r.line, r.id, ids, r.text)
                continue
            ids = tuple(int(i) for i in ids)
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
                yield Row(r.line, r.id, r.text, ids, None, answer, template)
            else:
                target = targets(r.target)
                if isinstance(target, str):
                    yield RowError(r.line, r.id, target, r.text)
                else:
                    yield Row(r.line, r.id, r.text, ids, target, None, template)
        pending.clear()

    for r in raw:
        if max_chars is not None and isinstance(r, RawRow) and len(r.text) > max_chars:
            r = too_long(r)
        pending.append(r)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def _chat_or_error(tokenizer, text: str):
    """The text's chat prompt, or the reason it has none (a string: the row's error)."""
    try:
        return chat_prompt(tokenizer, text)
    except (ValueError, TypeError) as e:
        return str(e)


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
