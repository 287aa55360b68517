"""Batch planning: the token budget, grouping by length, deterministic plans, ranks, targets, per-row checks."""
import random

import pytest

from gim_fast.jobs.batching import Row, TargetResolver, assign_ranks, pack, tokenize_rows
from gim_fast.jobs.inputs import RawRow, RowError

from jobs_support import char_tokenizer


def _rows(lengths, targets=None):
    targets = targets or [None] * len(lengths)
    return [Row(i + 1, str(i + 1), "x" * n, tuple(range(1, n + 1)), t) for i, (n, t) in enumerate(zip(lengths, targets))]


def test_pack_respects_the_budget_and_covers_every_row_once():
    rng = random.Random(0)
    rows = _rows([rng.randint(1, 50) for _ in range(300)], [rng.choice([None, 3]) for _ in range(300)])
    batches = pack(rows, batch_tokens=200)
    seen = [r.line for b in batches for r in b.rows]
    assert sorted(seen) == list(range(1, 301))
    for b in batches:
        assert b.length == max(len(r.token_ids) for r in b.rows)
        assert b.padded_tokens <= 200 or len(b.rows) == 1
        assert len({r.target_id is None for r in b.rows}) == 1        # named targets and top predictions apart
    assert [b.index for b in batches] == list(range(len(batches)))
    assert [b.length for b in batches] == sorted((b.length for b in batches), reverse=True)   # longest first
    # grouped by length: padding stays small
    assert sum(b.padded_tokens for b in batches) < 1.1 * sum(b.tokens for b in batches)
    assert pack(list(reversed(rows)), batch_tokens=200) == batches      # a pure function of the rows


def test_pack_limits():
    rows = _rows([10, 10, 10, 300])
    batches = pack(rows, batch_tokens=25)
    assert [len(b.rows) for b in batches] == [1, 2, 1]                  # the long row alone, over budget
    assert [len(b.rows) for b in pack(rows, batch_tokens=1000, batch_size=2)] == [2, 2]
    assert all(len(b.rows) == 1 for b in pack(rows, batch_tokens=1000, batch_size=1))
    with pytest.raises(ValueError):
        pack(rows, batch_tokens=0)


def test_assign_ranks_balances_padded_tokens():
    batches = pack(_rows([random.Random(1).randint(1, 64) for _ in range(500)]), batch_tokens=256)
    owners = assign_ranks(batches, 3)
    loads = [sum(b.padded_tokens for b, o in zip(batches, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(b.padded_tokens for b in batches)
    assert assign_ranks(batches, 1) == [0] * len(batches)
    assert assign_ranks(batches, 3) == owners


def test_target_resolver():
    tok = char_tokenizer()
    auto = TargetResolver(tok, 101)
    assert auto("a") == tok.encode("a", add_special_tokens=False)[0]
    assert auto(42) == 42 and auto("42") == 42
    assert "outside the vocabulary" in auto(101)
    assert "unknown target token 'ab'" in auto("ab") and "tokenizes to 2" in auto("ab")
    as_token = TargetResolver(tok, 101, "token")
    assert as_token("4") == tok.encode("4", add_special_tokens=False)[0]
    assert "token strings" in as_token(4)
    assert "not an integer" in TargetResolver(tok, 101, "id")("a")


def test_tokenize_rows_reports_bad_rows_in_order():
    tok = char_tokenizer()
    raw = [RawRow(1, "1", "hello"), RowError(2, None, "malformed JSON: x"), RawRow(3, "3", "x" * 20),
           RawRow(4, "4", "hi", "zz"), RawRow(5, "5", "hi", "z"), RawRow(6, "6", "é")]
    out = list(tokenize_rows(raw, tok, max_length=10, vocab_size=101, targets=TargetResolver(tok, 101), chunk=2))
    assert [x.line for x in out] == [1, 2, 3, 4, 5, 6]
    assert isinstance(out[0], Row) and out[0].token_ids == tuple(tok("hello").input_ids)
    assert out[2].reason == "too long: 20 tokens, more than --max-length 10"
    assert out[3].reason.startswith("unknown target token 'zz'")
    assert out[4].target_id == tok.encode("z", add_special_tokens=False)[0]
    assert isinstance(out[5], Row)              # 'é' is the unknown token: still one token, attributed
