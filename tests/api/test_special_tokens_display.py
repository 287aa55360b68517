"""Special tokens (e.g. Gemma's <bos>) are off the display scale of the terminal bars and the HTML colours, and
still shown with their exact score: a large <bos> score must not flatten the differences among the real tokens."""
import re
import xml.etree.ElementTree as ET

import pytest

from gim_fast.display import format_attributions
from gim_fast.html import HtmlRow, render_html, rows_from_table

from jobs_support import char_tokenizer, save_tiny

# Gemma-3-270M on "The capital of France is" -> " Paris": <bos> dwarfs the real tokens (scores rounded)
TOKENS = ["<bos>", "The", " capital", " of", " France", " is"]
SCORES = [-3.06, 0.21, 0.35, 0.08, 0.9, 0.45]
SPECIAL = [True, False, False, False, False, False]


def _bar_cells(line: str) -> float:
    bar = re.search(r"[█▏▎▍▌▋▊▉]+$", line)
    if not bar:
        return 0.0
    partial = "▏▎▍▌▋▊▉"
    return bar.group().count("█") + sum((partial.index(c) + 1) / 8 for c in bar.group() if c in partial)


def test_terminal_bars_scale_by_the_real_tokens():
    lines = format_attributions(TOKENS, SCORES, color=False, width=40, special=SPECIAL).split("\n")
    assert lines[0].split() == ["0", "<bos>", "-3.06", "(special)"]          # its exact score, no bar
    cells = [_bar_cells(line) for line in lines[1:]]
    assert max(cells) == 40 and cells[3] == 40                               # " France" fills the width
    for c, s in zip(cells, SCORES[1:]):
        assert c == pytest.approx(40 * abs(s) / 0.9, abs=1 / 8)
    # without the flags <bos> is the scale, as before
    plain = format_attributions(TOKENS, SCORES, color=False, width=40).split("\n")
    assert _bar_cells(plain[0]) == 40 and _bar_cells(plain[4]) == pytest.approx(40 * 0.9 / 3.06, abs=1 / 8)


def test_only_special_tokens_are_their_own_scale():
    lines = format_attributions(["<s>", "</s>"], [2.0, -1.0], color=False, width=8, special=[True, True]).split("\n")
    assert [_bar_cells(line) for line in lines] == [8, 4]
    with pytest.raises(ValueError, match="one per token"):
        format_attributions(["a", "b"], [1.0, 2.0], special=[True])


def test_html_colours_scale_by_the_real_tokens():
    page = render_html([HtmlRow(TOKENS, SCORES, target=" Paris", special=SPECIAL)])
    spans = [s for s in ET.fromstring(page.replace("<!DOCTYPE html>", "")).iter() if s.get("data-score")]
    assert [s.get("class") for s in spans] == ["tok special"] + ["tok"] * 5
    assert "transparent" in spans[0].get("style") and "-3.06" in spans[0].get("title")
    assert "rgba(22, 163, 74, 0.8)" in spans[4].get("style")                 # " France": full strength
    alphas = [float(re.search(r"rgba\([^)]*, ([0-9.]+)\)", s.get("style")).group(1)) for s in spans[1:]]
    for a, s in zip(alphas, SCORES[1:]):
        assert a == pytest.approx(0.08 + 0.72 * abs(s) / 0.9, abs=1e-3)


def test_job_report_rows_mark_special_tokens():
    rows = rows_from_table([{"tokens": ["<s>", "a"], "scores": [5.0, 1.0], "id": "x", "line": 1, "target": "b",
                             "target_logit": 1.0, "token_ids": [2, 70]}], special_ids=[2])
    assert rows[0].special == [True, False]


def test_cli_keeps_bos_off_the_scale(tmp_path, capsys):
    """A tiny model whose tokenizer adds <s> at the start: the line of <s> has its score and no bar."""
    from tokenizers import processors

    from gim_fast.cli import main

    folder = save_tiny(tmp_path / "tiny")
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    tok.save_pretrained(folder)
    html = tmp_path / "page.html"
    assert main(["explain", "hello", "--model", str(folder), "--color", "never", "--html", str(html)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert rows[0].split()[1] == "<s>" and rows[0].endswith("(special)")
    assert max(_bar_cells(r) for r in rows[1:]) == 40
    assert 'class="tok special"' in html.read_text()
