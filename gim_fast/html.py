"""Attributions as a self-contained HTML page: tokens coloured by score, the exact score on hover.

One block per row (a prompt and its target); green tokens push the target's logit up, red ones push it down,
the colour's strength is the score relative to the row's largest |score|. Special tokens (``<bos>``, ...) are left
out of that scale and shown uncoloured with a dashed outline, their exact score on hover, so that a large score on
<bos> does not wash out the colours of the real tokens. The page has no scripts and loads
nothing (no fonts, no stylesheets, no images): it opens offline, in a mail attachment or a notebook. The markup
is also well-formed XML, so any XML parser can read it back.

    from gim_fast.html import HtmlRow, render_html
    page = render_html([HtmlRow(tokens, scores, target=" Paris", target_logit=17.4, label="row 1")])
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .display import display_peak, plural

__all__ = ["HtmlRow", "render_html", "write_html", "rows_from_table"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
p.legend { color: #555; font-size: 0.9em; margin-top: 0; }
.key { padding: 0 0.4em; border-radius: 3px; }
section.row { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
section.row h2 { font-size: 0.95em; font-weight: 600; margin: 0 0 0.5em 0; color: #333; }
.meta { font-weight: normal; color: #666; }
.tokens { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 15px;
          line-height: 2.0; white-space: pre-wrap; word-break: break-word; }
.tok { padding: 2px 0; border-radius: 2px; cursor: default; box-shadow: inset -1px 0 rgba(0, 0, 0, 0.12); }
.tok:hover { outline: 1px solid #333; }
.target { margin-left: 0.6em; padding: 2px 4px; border: 1px dashed #888; border-radius: 3px; }
.nl { color: #999; }
.special { outline: 1px dashed #999; }
"""


@dataclass
class HtmlRow:
    """One block of the page: the tokens (as text, e.g. ``tokenizer.decode([id])``), one score per token."""

    tokens: Sequence[str]
    scores: Sequence[float]
    label: str = ""
    target: str | None = None
    target_logit: float | None = None
    token_ids: Sequence[int] | None = None
    meta: dict = field(default_factory=dict)
    special: Sequence[bool] | None = None   # one flag per token: special tokens are not on the colour scale


def _floats(scores) -> list[float]:
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().tolist()
    elif hasattr(scores, "tolist"):
        scores = scores.tolist()
    return [float(s) for s in scores]


def _colour(score: float, peak: float) -> str:
    if not math.isfinite(score) or peak <= 0:
        return "transparent"
    strength = min(abs(score) / peak, 1.0)
    alpha = round(0.08 + 0.72 * strength, 3) if strength > 0 else 0.0
    rgb = "22, 163, 74" if score > 0 else "220, 38, 38"
    return f"rgba({rgb}, {alpha})"


def _printable(text: str) -> str:
    """Control characters (other than newline and tab) as Python escapes: they are not allowed in XML."""
    return "".join(repr(ch)[1:-1] if (ord(ch) < 32 and ch not in "\n\t") or 0x7F <= ord(ch) < 0xA0
                   or 0xD800 <= ord(ch) < 0xE000 or ch in "\ufffe\uffff" else ch for ch in text)


def _token_html(token: str) -> str:
    """The token's text, escaped; a newline shows as '↵' and breaks the line, an empty token as '∅'."""
    if token == "":
        return '<span class="nl">∅</span>'
    token = _printable(token)
    parts = token.split("\n")
    out = escape(parts[0], quote=False)
    for part in parts[1:]:
        out += '<span class="nl">↵</span><br/>' + escape(part, quote=False)
    return out


def _row_html(row: HtmlRow, number: int) -> str:
    scores = _floats(row.scores)
    tokens = [str(t) for t in row.tokens]
    if len(tokens) != len(scores):
        raise ValueError(f"row {number}: {len(tokens)} tokens but {len(scores)} scores")
    special = list(row.special) if row.special is not None else [False] * len(scores)
    try:
        peak = display_peak(scores, special)
    except ValueError as e:
        raise ValueError(f"row {number}: {e}") from None
    on_scale = all(special)          # every token special: they are the scale
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores)):
        tip = f"score {score:+.6g} | token {_printable(repr(token))}"
        if row.token_ids is not None:
            tip += f" (id {int(row.token_ids[i])})"
        tip += f" | position {i}"
        kind, colour = "tok", _colour(score, peak)
        if special[i] and not on_scale:
            kind, colour = "tok special", "transparent"
            tip += " | special token: not on the colour scale"
        spans.append(f'<span class="{kind}" style="background-color: {colour}" data-score="{score:.6g}" '
                     f'title="{escape(tip)}">{_token_html(token)}</span>')
    heading = escape(_printable(row.label or f"row {number}"))
    meta = []
    if row.target is not None:
        meta.append(f"target {escape(_printable(repr(row.target)))}")
    if row.target_logit is not None and math.isfinite(row.target_logit):
        meta.append(f"logit {row.target_logit:.4g}")
    meta.append(plural(len(tokens), "token"))
    meta.extend(escape(f"{k} {v}") for k, v in row.meta.items())
    target = ""
    if row.target is not None:
        target = f'<span class="target" title="the explained next token">{_token_html(row.target)}</span>'
    return (f'<section class="row">\n<h2>{heading} <span class="meta">— {" · ".join(meta)}</span></h2>\n'
            f'<div class="tokens">{"".join(spans)}{target}</div>\n</section>')


def render_html(rows: Iterable[HtmlRow], *, title: str = "GIM attributions", subtitle: str = "") -> str:
    """The whole page as a string (UTF-8, no external resources, well-formed XML markup)."""
    blocks = [_row_html(row, n) for n, row in enumerate(rows, start=1)]
    sub = f"<p class=\"legend\">{escape(subtitle)}</p>\n" if subtitle else ""
    legend = ('<p class="legend"><span class="key" style="background-color: rgba(22, 163, 74, 0.6)">green</span> '
              'raises the target logit, <span class="key" style="background-color: rgba(220, 38, 38, 0.6)">red</span> '
              "lowers it; strength is |score| relative to the row's largest, special tokens (dashed outline) left out. "
              "Hover a token for its score.</p>")
    return ("<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n{sub}{legend}\n" + "\n".join(blocks) + "\n</body>\n</html>\n")


def write_html(path: str | os.PathLike, rows: Iterable[HtmlRow], **kwargs) -> Path:
    """Write :func:`render_html` to ``path`` (through a temporary file and a rename); returns the path."""
    path = Path(path)
    text = render_html(rows, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def rows_from_table(table, special_ids: Iterable[int] = ()) -> list[HtmlRow]:
    """HtmlRows from a job's results (a pyarrow Table or a list of dicts with the job's output columns);
    ``special_ids``: the tokenizer's special token ids (``tokenizer.all_special_ids``), kept off the colour scale."""
    records = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    special_ids = set(special_ids)
    return [HtmlRow(r["tokens"], r["scores"], label=f"id {r['id']} (line {r['line']})", target=r["target"],
                    target_logit=r["target_logit"], token_ids=r["token_ids"],
                    special=[i in special_ids for i in r["token_ids"]]) for r in records]
