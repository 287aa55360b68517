"""gim_fast.display.format_attributions."""
import re

import numpy as np
import pytest
import torch

from gim_fast.display import format_attributions

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_one_line_per_token_with_score_and_proportional_bar():
    text = format_attributions(["The", " capital", " is"], [0.5, -2.0, 1.0], color=False, width=8)
    lines = text.split("\n")
    assert len(lines) == 3
    assert lines[0].split() == ["0", "The", "+0.5", "██"]
    assert lines[1].split() == ["1", "·capital", "-2", "████████"]
    assert lines[2].split() == ["2", "·is", "+1", "████"]
    # fixed-width token and score columns: the bars start in the same column
    assert len({line.index("█") for line in lines}) == 1


def test_four_significant_digits_and_eighth_blocks():
    text = format_attributions(["a", "b"], [1.0, 0.123456], color=False, width=1)
    assert "+0.1235" in text
    assert text.split("\n")[1].endswith("▏")     # 0.12 of one cell ≈ 1/8


def test_whitespace_and_control_characters_are_visible():
    text = format_attributions([" a b", "\n", "\t", "", "\x00"], [1, 1, 1, 1, 1], color=False)
    tokens = [line.split()[1] for line in text.split("\n")]
    assert tokens == ["·a·b", "\\n", "\\t", "∅", "\\x00"]


def test_long_tokens_are_cut_to_a_fixed_width():
    text = format_attributions(["x" * 100, "y"], [1, 1], color=False)
    first, second = text.split("\n")
    assert "…" in first and "x" * 100 not in first
    assert first.index("+1") == second.index("+1")


def test_color_red_for_negative_green_for_positive():
    text = format_attributions(["a", "b", "c"], [1.0, -1.0, 0.0], color=True, width=4)
    a, b, c = text.split("\n")
    assert "\x1b[32m████\x1b[0m" in a
    assert "\x1b[31m████\x1b[0m" in b
    assert "\x1b[" not in c                       # no bar, no escape
    assert ANSI.sub("", text) == format_attributions(["a", "b", "c"], [1.0, -1.0, 0.0], color=False, width=4)


def test_color_auto_respects_no_color_and_tty(monkeypatch):
    class TTY:
        def isatty(self):
            return True

        def write(self, s):
            pass

    monkeypatch.setattr("sys.stdout", TTY())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[" in format_attributions(["a"], [1.0])
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in format_attributions(["a"], [1.0])


def test_accepts_tensors_arrays_and_odd_values():
    tokens = ["a", "b", "c", "d"]
    expected = format_attributions(tokens, [0.25, -0.5, 0.0, 1.0], color=False)
    assert format_attributions(tokens, torch.tensor([0.25, -0.5, 0.0, 1.0], dtype=torch.bfloat16), color=False) \
        == expected
    assert format_attributions(tokens, np.array([0.25, -0.5, 0.0, 1.0]), color=False) == expected
    assert format_attributions(["a", "b"], [0.0, 0.0], color=False).count("█") == 0
    text = format_attributions(["a", "b", "c"], [float("nan"), float("inf"), 1.0], color=False, width=4)
    assert "nan" in text and "+inf  ████" in text
    assert format_attributions([], [], color=False) == ""
    assert "-0" not in format_attributions(["a"], [-0.0], color=False)


def test_errors():
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        format_attributions(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        format_attributions(["a"], torch.ones(1, 1))
