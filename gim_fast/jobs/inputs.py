"""Reading a job's input rows: JSON Lines, CSV/TSV, Parquet or plain text (one prompt per line).

Every reader yields, in file order, either a :class:`RawRow` or a :class:`RowError` (a row that cannot be read:
malformed JSON, a missing text field, ...), each with its 1-based line number (the row number for Parquet, the
first line of the record for CSV). Nothing is skipped silently: a row that cannot be used becomes a RowError.
A problem with the whole file (no such file, an unknown format, a text column that does not exist) raises
:class:`InputError`; :func:`check_input` finds those before anything else is done. Text files may start with a
UTF-8 byte-order mark. A row's id is its ``id_field``; without one, its ``id`` field when it has one, else its
line number.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..display import plural
from ..textfiles import TextFileError, iter_lines

__all__ = ["FORMATS", "DEFAULT_ID_FIELD", "InputError", "RawRow", "RowError", "detect_format", "check_input",
           "read_rows", "fingerprint"]

FORMATS = ("jsonl", "csv", "tsv", "parquet", "text")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
DEFAULT_ID_FIELD = "id"   # without --id-field, a row that has this field keeps it as its id
_SHOWN_TEXT = 200         # characters of a bad row's text kept in errors.jsonl


class InputError(ValueError):
    """The input as a whole cannot be read (reported in one line; the CLI exits with code 2)."""


@dataclass(frozen=True)
class RawRow:
    """One input row as read: its text, and the target (token string or id), the answer (text) and the id when
    the data has them."""

    line: int
    id: str
    text: str
    target: str | int | None = None
    answer: str | None = None


@dataclass(frozen=True)
class Fields:
    """The input's column names: the text, and optionally a target, an id and an answer."""

    text: str = "text"
    target: str | None = None
    id: str | None = None
    answer: str | None = None

    def options(self):
        """(command-line option, column name) of every column asked for."""
        return [(o, n) for o, n in (("--text-field", self.text), ("--target-field", self.target),
                                    ("--id-field", self.id), ("--answer-field", self.answer)) if n]


@dataclass(frozen=True)
class RowError:
    """A row that is not attributed, and why. ``text`` is the row's text, or its raw line when it has no usable
    text (None only when there is neither), cut to its first 200 characters: a huge bad row is not kept."""

    line: int
    id: str | None
    reason: str
    text: str | None = None

    def __post_init__(self):
        if self.text is not None and len(self.text) > _SHOWN_TEXT:
            object.__setattr__(self, "text", self.text[:_SHOWN_TEXT] + "…")

    def as_dict(self) -> dict:
        return {"line": self.line, "id": self.id, "reason": self.reason, "text": self.text}


def detect_format(path: str | os.PathLike, format: str | None = None) -> str:
    """``format`` if given, else the one the file name's suffix says."""
    if format is not None:
        if format not in FORMATS:
            raise InputError(f"unknown input format {format!r}; accepted: {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"cannot tell the format of {os.fspath(path)!r} from its suffix {suffix!r}; name it "
                         f"{', '.join(sorted(_SUFFIXES))} or pass --format ({', '.join(FORMATS)})")
    return _SUFFIXES[suffix]


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes: a job refuses to resume on other input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_record(record, line: int, fields: Fields, raw: str | None = None):
    """A RawRow or RowError from one mapping (a JSON object, a CSV record, a Parquet row); ``raw`` is the row as
    written in the file, shown for a row without a usable text."""
    text_field, target_field, id_field = fields.text, fields.target, fields.id
    if id_field:
        raw_id = record.get(id_field)
        if raw_id is None:
            return RowError(line, None, f"missing id field {id_field!r}", raw)
    else:
        raw_id = record.get(DEFAULT_ID_FIELD)
        if raw_id in ("", None):
            raw_id = line
    row_id = str(raw_id)
    if text_field not in record:
        return RowError(line, row_id, f"missing text field {text_field!r}", raw)
    text = record[text_field]
    if text is None:
        return RowError(line, row_id, "empty text (null)", raw)
    if not isinstance(text, str):
        return RowError(line, row_id, f"text field {text_field!r} is not a string but {type(text).__name__}", raw)
    if not text.strip():
        return RowError(line, row_id, "empty text", text)
    target = record.get(target_field) if target_field else None
    if isinstance(target, bool) or not (target is None or isinstance(target, (str, int))):
        return RowError(line, row_id, f"target field {target_field!r} must be a token string or an integer id, "
                                      f"got {type(target).__name__}", text)
    if target == "":
        target = None
    answer = None
    if fields.answer:
        if fields.answer not in record:
            return RowError(line, row_id, f"missing answer field {fields.answer!r}", text)
        answer = record[fields.answer]
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            return RowError(line, row_id, f"empty answer (field {fields.answer!r})", text)
        if not isinstance(answer, str):
            return RowError(line, row_id, f"answer field {fields.answer!r} is not a string but "
                                          f"{type(answer).__name__}", text)
    return RawRow(line, row_id, text, target, answer)


def _open(path):
    """A text file for reading: UTF-8, a leading byte-order mark dropped, line endings kept as written."""
    return open(path, encoding="utf-8-sig", errors="strict", newline="")


def _read_jsonl(path, fields: Fields) -> Iterator[RawRow | RowError]:
    for line, raw in _utf8_lines(path):
        if not raw.strip():
            yield RowError(line, None, "empty line", raw)
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:
            yield RowError(line, None, f"malformed JSON: {e}", raw)
            continue
        if isinstance(record, str):      # a bare JSON string is a text
            record = {fields.text: record}
        if not isinstance(record, dict):
            yield RowError(line, None, f"not a JSON object but {type(record).__name__}", raw)
            continue
        yield _from_record(record, line, fields, raw)


def _utf8_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (see ``gim_fast.textfiles.iter_lines``); a byte that is not UTF-8
    is an :class:`InputError` naming its line."""
    try:
        yield from iter_lines(path)
    except TextFileError as e:
        raise InputError(str(e)) from None


def _read_text(path, fields: Fields) -> Iterator[RawRow | RowError]:
    _check_text_fields(fields)
    for line, text in _utf8_lines(path):
        if not text.strip():
            yield RowError(line, str(line), "empty text", text)
        else:
            yield RawRow(line, str(line), text)


def _check_text_fields(fields: Fields) -> None:
    if fields.target or fields.id or fields.answer:
        raise InputError("a plain-text input has no fields: --target-field, --id-field and --answer-field need JSON "
                         "Lines, CSV or Parquet")


def _csv_header(reader, path) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the header of {os.fspath(path)!r}: {e}") from None


def _read_csv(path, fields: Fields, delimiter) -> Iterator[RawRow | RowError]:
    with _open(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = _csv_header(reader, path)
        if header is None:
            return
        _check_columns(path, header, fields)
        first = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield RowError(first, None, f"malformed CSV record: {e}")
                first = reader.line_num + 1
                continue
            except UnicodeDecodeError as e:
                raise InputError(f"{os.fspath(path)!r} is not UTF-8 text: {e}") from None
            line, first = first, reader.line_num + 1
            if len(values) != len(header):
                if not values or values == [""]:
                    yield RowError(line, None, "empty line", "")
                else:
                    yield RowError(line, None, f"malformed CSV record: {len(values)} fields where the header has "
                                               f"{len(header)}", delimiter.join(values))
                continue
            record = dict(zip(header, values))
            for name in (fields.id, fields.target):      # an empty cell is a missing value
                if name and record.get(name) == "":
                    record[name] = None
            yield _from_record(record, line, fields, delimiter.join(values))


def _check_columns(path, columns, fields: Fields) -> None:
    for option, name in fields.options():
        if name not in columns:
            shown = ", ".join(repr(c) for c in list(columns)[:20])
            raise InputError(f"{os.fspath(path)!r} has no column {name!r} (given as {option}); its columns are: "
                             f"{shown}")


_CHECKED_ROWS = 100     # JSON Lines rows read before the model loads, to find a field name that is not there


def _check_jsonl_fields(path, fields: Fields) -> None:
    """JSON Lines have no header: a field name that no row has (a typo in --answer-field) would make every row a
    bad row after the model loaded. So the first rows that are JSON objects (up to 100) are read now, and a field
    asked for that none of them has is an :class:`InputError` listing the fields they do have. A line that is not
    UTF-8 among them is one too (with its line number)."""
    seen: dict[str, None] = {}
    objects = 0
    try:
        for _, raw in iter_lines(path):
            if objects >= _CHECKED_ROWS:
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue                      # a malformed line is that row's error, not the file's
            if isinstance(record, str):
                record = {fields.text: record}
            if isinstance(record, dict):
                objects += 1
                seen.update(dict.fromkeys(record))
    except TextFileError as e:
        raise InputError(str(e)) from None
    if not objects:
        return
    for option, name in fields.options():
        if name not in seen:
            shown = ", ".join(repr(c) for c in list(seen)[:20]) or "none"
            raise InputError(f"{os.fspath(path)!r}: none of its first {plural(objects, 'row')} has the field {name!r} "
                             f"(given as {option}); their fields are: {shown}")


def _parquet_file(path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError kinds
        raise InputError(f"cannot read {os.fspath(path)!r} as Parquet: {e}") from None


def _read_parquet(path, fields: Fields) -> Iterator[RawRow | RowError]:
    file = _parquet_file(path)
    names = file.schema_arrow.names
    _check_columns(path, names, fields)
    default_id = DEFAULT_ID_FIELD if fields.id is None and DEFAULT_ID_FIELD in names else None
    columns = [name for _, name in fields.options()] + ([default_id] if default_id else [])
    line = 0
    for batch in file.iter_batches(columns=list(dict.fromkeys(columns)), batch_size=8192):
        for record in batch.to_pylist():
            line += 1
            yield _from_record(record, line, fields)


def _read_records(records: Iterable, fields: Fields) -> Iterator[RawRow | RowError]:
    """In-memory input for the Python API: strings, or mappings with the text (and target, id, answer) fields."""
    for line, record in enumerate(records, start=1):
        if isinstance(record, str):
            record = {fields.text: record}
        if not isinstance(record, dict):
            yield RowError(line, None, f"a row must be a string or a dict, got {type(record).__name__}")
            continue
        yield _from_record(record, line, fields)


def check_input(path: str | os.PathLike, *, format: str | None = None, text_field: str = "text",
                target_field: str | None = None, id_field: str | None = None, answer_field: str | None = None) -> str:
    """What can be known about the input file before reading its rows: its format, that it exists, and that the
    named columns exist (CSV/TSV header, Parquet schema; JSON Lines rows are checked one by one). Returns the
    format; raises :class:`InputError`."""
    fields = Fields(text_field, target_field, id_field, answer_field)
    kind = detect_format(path, format)
    if not Path(path).is_file():
        raise InputError(f"no such input file: {os.fspath(path)!r}")
    if kind == "text":
        _check_text_fields(fields)
    elif kind == "jsonl":
        _check_jsonl_fields(path, fields)
    elif kind in ("csv", "tsv"):
        with _open(path) as f:
            header = _csv_header(csv.reader(f, delimiter="," if kind == "csv" else "\t"), path)
        if header is not None:
            _check_columns(path, header, fields)
    elif kind == "parquet":
        _check_columns(path, _parquet_file(path).schema_arrow.names, fields)
    return kind


def read_rows(source, *, format: str | None = None, text_field: str = "text", target_field: str | None = None,
              id_field: str | None = None, answer_field: str | None = None) -> Iterator[RawRow | RowError]:
    """Every row of ``source`` (a path, or for the Python API an iterable of strings or dicts), in order."""
    fields = Fields(text_field, target_field, id_field, answer_field)
    if not isinstance(source, (str, os.PathLike)):
        if format is not None:
            raise InputError("format= applies to files only; in-memory rows are strings or dicts")
        return _read_records(source, fields)
    path = Path(source)
    kind = detect_format(path, format)
    if not path.is_file():
        raise InputError(f"no such input file: {os.fspath(source)!r}")
    if kind == "jsonl":
        return _read_jsonl(path, fields)
    if kind == "text":
        return _read_text(path, fields)
    if kind in ("csv", "tsv"):
        return _read_csv(path, fields, "," if kind == "csv" else "\t")
    return _read_parquet(path, fields)
