"""Rows of a dataset job as a new user writes them: a byte-order mark, ids in the data, bad rows that carry their
text, and rows far too long for the model (rejected in bounded time and memory, never a row that fits)."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from gim_fast.jobs.batching import Row, TargetResolver, max_chars_per_token, tokenize_rows
from gim_fast.jobs.inputs import RawRow, RowError, check_input, read_rows

from jobs_support import ROOT, char_tokenizer, save_tiny, write_jsonl

BOM = "\ufeff"


# ------------------------------------------------------------------------------------------ byte-order mark

@pytest.mark.parametrize("kind,content", [
    ("jsonl", '{"text": "first", "id": "a"}\n{"text": "second", "id": "b"}\n'),
    ("csv", "id,text\na,first\nb,second\n"),
    ("tsv", "id\ttext\na\tfirst\nb\tsecond\n"),
    ("txt", "first\nsecond\n"),
])
def test_a_leading_byte_order_mark_is_accepted(tmp_path, kind, content):
    path = tmp_path / f"in.{kind}"
    path.write_text(BOM + content, encoding="utf-8")
    id_field = None if kind == "txt" else "id"
    check_input(path, id_field=id_field)                     # the header's first column is 'id', not '\ufeffid'
    rows = list(read_rows(path, id_field=id_field))
    assert [type(r) for r in rows] == [RawRow, RawRow], rows
    assert [r.text for r in rows] == ["first", "second"]
    assert [r.id for r in rows] == (["1", "2"] if kind == "txt" else ["a", "b"])


# ------------------------------------------------------------------------------------------ ids

def test_the_id_field_is_the_default_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"id": "q1", "text": "a"}, {"text": "b"}, {"id": 7, "text": "c"}])
    assert [r.id for r in read_rows(jsonl)] == ["q1", "2", "7"]       # no id field: the line number
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("text,id\na,x1\nb,\n", encoding="utf-8")
    assert [r.id for r in read_rows(csv_path)] == ["x1", "3"]         # an empty id cell: the line number
    plain = tmp_path / "plain.csv"
    plain.write_text("text\na\nb\n", encoding="utf-8")
    assert [r.id for r in read_rows(plain)] == ["2", "3"]
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "id": [10, 11]}), parquet)
    assert [r.id for r in read_rows(parquet)] == ["10", "11"]
    assert [r.id for r in read_rows([{"text": "a", "id": "m"}, "b"])] == ["m", "2"]
    # --id-field still names another column, and a row without it is a bad row
    rows = list(read_rows(jsonl, id_field="key"))
    assert all(isinstance(r, RowError) and r.reason == "missing id field 'key'" for r in rows)


def test_cli_rows_keep_their_ids(tmp_path):
    from gim_fast.cli import main
    from gim_fast.jobs import read_results

    model = save_tiny(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "alpha", "text": "hello"}, {"id": "beta", "text": "abc"}])
    assert main(["attribute", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(model),
                 "--no-progress"]) == 0
    assert read_results(tmp_path / "out").column("id").to_pylist() == ["alpha", "beta"]


# ------------------------------------------------------------------------------------------ errors.jsonl

def test_every_error_row_carries_its_text(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = ['{"text": "fine"}', "", "   ", '{"txt": "no text field"}', "[1, 2]", '{"text": "broken"', '{"text": null}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = [r for r in read_rows(path) if isinstance(r, RowError)]
    assert [e.line for e in errors] == [2, 3, 4, 5, 6, 7]
    for e in errors:
        record = e.as_dict()
        assert set(record) == {"line", "id", "reason", "text"}, record
        assert record["text"] == lines[e.line - 1], record      # the row as written, when it has no usable text
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("text,n\nok,1\n\nonly\n", encoding="utf-8")
    errors = [r.as_dict() for r in read_rows(csv_path) if isinstance(r, RowError)]
    assert [(e["line"], e["text"]) for e in errors] == [(3, ""), (4, "only")]


def test_a_huge_bad_row_is_not_kept_whole():
    error = RowError(1, "1", "malformed JSON", "x" * 10_000_000)
    assert len(error.text) == 201 and error.text.endswith("…")


# ------------------------------------------------------------------------------------------ rows too long

class _CountingTokenizer:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_huge_row_is_rejected_without_being_tokenized():
    tok = _CountingTokenizer(char_tokenizer())
    per_token = max_chars_per_token(tok)
    assert per_token == max(map(len, tok.get_vocab()))             # "<extra_100>": 11 characters
    huge = "a" * 5_000_000
    raw = [RawRow(1, "1", "hello"), RawRow(2, "2", huge), RawRow(3, "3", "x" * (20 * per_token)),
           RawRow(4, "4", "x" * (20 * per_token + 1))]
    started = time.perf_counter()
    out = list(tokenize_rows(raw, tok, max_length=20, vocab_size=101, targets=TargetResolver(tok, 101)))
    assert time.perf_counter() - started < 5
    assert isinstance(out[0], Row) and [r.line for r in out] == [1, 2, 3, 4]
    assert out[1].reason == (f"too long: 5000000 characters, more than the {20 * per_token} that --max-length 20 "
                             f"tokens can hold (no token of this tokenizer stands for more than {per_token} "
                             "characters)")
    assert len(out[1].text) == 201                                   # not the whole 5 MB in errors.jsonl
    assert out[2].reason == f"too long: {20 * per_token} tokens, more than --max-length 20"   # at the bound: counted
    assert out[3].reason.startswith(f"too long: {20 * per_token + 1} characters")
    assert tok.longest <= 20 * per_token                             # the huge row never reached the tokenizer


def _sentencepiece_style():
    """Gemma / Llama-2 style: spaces become '▁', BPE with byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "c", "▁a", "▁ab", "▁abc", "▁▁", "▁▁▁▁"):
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁a", "b"), ("▁ab", "c"), ("▁", "▁"), ("▁▁", "▁▁")]
    core = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                           fuse_unk=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _fast(core)


def _fast(core, **kwargs):
    import transformers as tf

    return tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **kwargs)


ADVERSARIAL = ["a" * 300, " " * 300, "\n" * 200, "\t" * 99, "#" * 500, "\n" + " " * 80, ("\n" + " " * 80) * 7,
               "é" * 50, "e\u0301" * 40, "日本語のテキスト" * 10, "🙂" * 30, "<s>" * 20, "<|im_start|>" * 10,
               "The capital of France is Paris. " * 20, "".join(chr(c) for c in range(32, 400)),
               "abc abc  abc   " * 15]


def test_the_character_bound_holds_on_adversarial_texts(smollm2):
    """max_length × L characters never reject a row that fits: every text has at least len/L tokens."""
    for tok in (char_tokenizer(), _sentencepiece_style(), smollm2[1]):
        per_token = max_chars_per_token(tok)
        assert per_token is not None, type(tok)
        for text in ADVERSARIAL:
            n = len(tok(text)["input_ids"])
            assert n >= math.ceil(len(text) / per_token), (text[:30], n, per_token)


def test_no_bound_for_tokenizers_that_drop_or_merge_characters():
    def with_normalizer(normalizer):
        core = tokenizers.Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1, " ": 2}, merges=[], unk_token="<unk>"))
        core.normalizer = normalizer
        return _fast(core)

    assert max_chars_per_token(with_normalizer(None)) == 5                                   # "<unk>"
    assert max_chars_per_token(with_normalizer(normalizers.Replace(" ", "▁"))) == 5
    for collapsing in (normalizers.Replace(tokenizers.Regex(" {2,}"), " "), normalizers.NFKC(), normalizers.Strip(),
                       normalizers.Sequence([normalizers.Lowercase(), normalizers.StripAccents()])):
        assert max_chars_per_token(with_normalizer(collapsing)) is None, collapsing
    core = tokenizers.Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()                                          # drops whitespace
    assert max_chars_per_token(_fast(core)) is None
    fused = tokenizers.Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>", fuse_unk=True))
    assert max_chars_per_token(_fast(fused)) is None                                          # "xyz" -> one <unk>
    wordpiece = tokenizers.Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_chars_per_token(_fast(wordpiece)) is None
    stripping = char_tokenizer()
    stripping.add_special_tokens({"additional_special_tokens": [tokenizers.AddedToken("<m>", lstrip=True)]})
    assert max_chars_per_token(stripping) is None                                             # " <m>": one token


def test_huge_jsonl_line_end_to_end(tmp_path):
    """A 10 MB line of a JSON Lines file: set aside as too long in seconds, without tokenizing it (which would take
    many GB and minutes), and the other rows attributed."""
    model = save_tiny(tmp_path / "tiny")
    data = tmp_path / "in.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "hello"}) + "\n")
        f.write(json.dumps({"text": "ab " * 3_500_000}) + "\n")
        f.write(json.dumps({"text": "world"}) + "\n")
    # the peak is read from /proc/self/status (VmHWM, this process's own address space): ru_maxrss of an exec'd child
    # starts from the parent's peak at fork time on Linux, so after a long test session it measured pytest, not the job
    code = ("import runpy, sys\n"
            "sys.argv = ['gim-fast'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('gim_fast', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print('maxrss_kb', hwm)\n"
            "sys.exit(code)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "attribute", "--data", str(data), "--out", str(tmp_path / "out"),
                           "--model", str(model), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 bad row set aside" in done.stdout and "too long: 10500000 characters" in done.stdout
    maxrss_mb = int(done.stdout.split("maxrss_kb")[1].split()[0]) / 1024
    # the 10.5 MB line is held a few times over (the line, the parsed JSON, the text); tokenizing it would not fit
    print(f"peak RSS {maxrss_mb:.0f} MB, {seconds:.1f} s")
    assert maxrss_mb < 2000, maxrss_mb
    assert seconds < 120, seconds
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert error["line"] == 2 and len(error["text"]) == 201
