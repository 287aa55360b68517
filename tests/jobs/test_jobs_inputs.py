"""Input readers of dataset jobs: every format, line numbers, and bad rows reported instead of dropped."""
import json

import pytest

from gim_fast.jobs.inputs import InputError, RawRow, RowError, detect_format, read_rows


def _rows(path, **kw):
    return list(read_rows(path, **kw))


def test_jsonl_rows_and_bad_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "one", "target": " Paris", "id": 7}\n'
                    '{"text": "two"\n'                        # malformed
                    '\n'                                       # empty line
                    '[1, 2]\n'                                 # not an object
                    '{"txt": "three"}\n'                       # no text field
                    '{"text": "   "}\n'                        # empty text
                    '"a bare string"\r\n'                      # a JSON string is a text; CRLF
                    '{"text": "four", "target": 42}\n'
                    '{"text": 5}\n', encoding="utf-8")
    rows = _rows(path, target_field="target", id_field="id")
    assert [r.line for r in rows] == list(range(1, 10))
    assert rows[0] == RawRow(1, "7", "one", " Paris")
    assert isinstance(rows[1], RowError) and rows[1].reason.startswith("malformed JSON")
    assert rows[2].reason == "empty line"
    assert rows[3].reason == "not a JSON object but list"
    assert rows[4].reason == "missing id field 'id'"
    assert rows[5].reason == "missing id field 'id'"
    rows = _rows(path, target_field="target")
    assert rows[4].reason == "missing text field 'text'"
    assert rows[5].reason == "empty text"
    assert rows[6] == RawRow(7, "7", "a bare string", None)
    assert rows[7] == RawRow(8, "8", "four", 42)
    assert "not a string" in rows[8].reason


def test_csv_and_tsv(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,text,target\n'
                    'a,"Hello, world",\n'
                    'b,"two\nlines", Paris\n'                  # a quoted newline: the record starts on line 3
                    'c,only two\n'                             # wrong number of fields
                    '\n'
                    'd,,x\n', encoding="utf-8")
    rows = _rows(path, target_field="target", id_field="id")
    assert rows[0] == RawRow(2, "a", "Hello, world", None)
    assert rows[1] == RawRow(3, "b", "two\nlines", " Paris")
    assert rows[2].line == 5 and "2 fields where the header has 3" in rows[2].reason
    assert rows[3].line == 6 and rows[3].reason == "empty line"
    assert rows[4].line == 7 and rows[4].reason == "empty text"
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\tn\nfirst\t1\nsecond\t2\n", encoding="utf-8")
    assert [r.text for r in _rows(tsv)] == ["first", "second"]
    with pytest.raises(InputError, match="no column 'prompt'"):
        _rows(path, text_field="prompt")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "target": [None, 5, 3], "k": [10, 11, 12]}), path)
    rows = _rows(path, target_field="target", id_field="k")
    assert rows[0] == RawRow(1, "10", "a", None)
    assert rows[1] == RowError(2, "11", "empty text (null)")
    assert rows[2] == RawRow(3, "12", "c", 3)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="as Parquet"):
        _rows(bad)


def test_plain_text(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("The capital of France is\n\n  \nWater boils at\n", encoding="utf-8")
    rows = _rows(path)
    assert rows[0] == RawRow(1, "1", "The capital of France is")
    assert rows[1] == RowError(2, "2", "empty text", "") and rows[2].reason == "empty text"
    assert rows[3] == RawRow(4, "4", "Water boils at")
    assert len(rows) == 4                       # the final newline does not make a fifth row
    with pytest.raises(InputError, match="no fields"):
        _rows(path, target_field="target")


def test_formats_and_whole_file_errors(tmp_path):
    assert detect_format("x.JSONL") == "jsonl" and detect_format("x.pq") == "parquet"
    assert detect_format("x.dat", "csv") == "csv"
    with pytest.raises(InputError, match="--format"):
        detect_format("x.dat")
    with pytest.raises(InputError, match="unknown input format"):
        detect_format("x.csv", "xml")
    with pytest.raises(InputError, match="no such input file"):
        _rows(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        _rows(latin)


def test_in_memory_records():
    rows = list(read_rows(["plain", {"text": "dict", "t": " x"}, 3], target_field="t"))
    assert rows[0] == RawRow(1, "1", "plain") and rows[1] == RawRow(2, "2", "dict", " x")
    assert rows[2].reason == "a row must be a string or a dict, got int"


def test_error_record_cuts_long_text():
    record = RowError(3, "x", "too long", "y" * 500).as_dict()
    assert record["line"] == 3 and len(record["text"]) == 201 and json.dumps(record)
