"""Reading the text files a user names (task files, data files, a prompt file): UTF-8, with an error that names the
file, the line and the column of the first byte that is not UTF-8, instead of Python's bare
"'utf-8' codec can't decode byte 0xe9 in position 17".

The files are read as bytes and decoded line by line, so a bad byte is reported wherever it is in the file, before
anything that uses the file's content (a model load) starts.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

__all__ = ["TextFileError", "iter_lines", "read_text"]

_BOM = b"\xef\xbb\xbf"


class TextFileError(ValueError):
    """A file that cannot be read as UTF-8 text (one line: the file, the line, the byte, the fix)."""


def _decode(raw: bytes, path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1]
        raise TextFileError(
            f"{os.fspath(path)}: line {line}, column {len(raw[:e.start].decode('utf-8', 'replace')) + 1}: byte "
            f"0x{bad.hex()} is not UTF-8 ({e.reason}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text without its line ending)`` for every line of a UTF-8 file; a leading byte-order
    mark is dropped, ``\\n`` and ``\\r\\n`` end lines, a final newline does not make an empty line. Raises
    :class:`TextFileError` at the first line that is not UTF-8, OSError when the file cannot be opened."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            yield number, _decode(raw, path, number)


def read_text(path: str | os.PathLike) -> str:
    """The whole file as text (UTF-8, a leading byte-order mark dropped, line endings kept); :class:`TextFileError`
    naming the line of the first byte that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        _decode(data[start:end if end >= 0 else len(data)], path, line)
        raise   # not reached: the line holding the bad byte does not decode either
