"""Attributions as a self-contained HTML page: tokens coloured by score, the exact score on hover.

One block per row (a prompt and its target); green tokens push the target's logit up, red ones push it down,
the colour's strength is the score relative to the row's largest |score|. Special tokens (``<bos>``, ...) are left
out of that scale and shown uncoloured with a dashed outline, their exact score on hover, so that a large score on
<bos> does not wash out the colours of the real tokens. The page has no scripts and loads
nothing (no fonts, no stylesheets, no images): it opens offline, in a mail attachment or a notebook. The markup
is also well-formed XML, so any XML parser can read it back.

    from gim_fast.html import HtmlRow, render_html
    page = render_html([HtmlRow(tokens, scores, target=" Paris", target_logit=17.4, label="row 1")])

An answer of several tokens (``explain_answer``, ``attribute_context``) gets its own view: the sources (documents
or prompt tokens) coloured by their score for the whole answer, recoloured by an answer token's own scores while
the pointer is on it (pure CSS: a sibling selector per answer position, each source carrying one colour per
answer token as a custom property), and a sources × answer-tokens heatmap table:

    from gim_fast.html import AnswerView, render_answer_html
    page = render_answer_html([AnswerView(sources, answer_tokens, scores)])   # scores [M answer tokens, n sources]
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .display import display_peak, plural

__all__ = ["HtmlRow", "render_html", "write_html", "rows_from_table", "AnswerView", "render_answer_html",
           "write_answer_html", "answer_views_from_table"]

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


_HEADING_CHARS = 100      # a label longer than this (a long prompt) is cut in the heading; the full text is its tooltip


def _heading_html(label: str) -> str:
    """A block's heading: the label's first line, cut to 100 characters, so that a long prompt does not push its
    coloured tokens off the first screen; the whole label (up to 2,000 characters) is the heading's tooltip."""
    label = _printable(label)
    first = label.split("\n", 1)[0]
    if len(first) <= _HEADING_CHARS and first == label:
        return escape(label)
    cut = first[:_HEADING_CHARS].rstrip() + " …"
    tip = label if len(label) <= 2000 else label[:2000] + " …"
    return f'<span title="{escape(tip)}">{escape(cut, quote=False)}</span>'


def _label_text(text: str) -> str:
    """A label that stays visible when it is only whitespace (a newline token as a row label): line breaks as
    '↵', tabs as '⇥', spaces as '·'; other labels as they are."""
    text = _printable(text)
    if text.strip():
        return text.replace("\n", "↵").replace("\t", "⇥")
    return "".join({"\n": "↵", "\t": "⇥", "\r": "␍"}.get(c, "·") for c in text) or "∅"


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
    heading = _heading_html(row.label or f"row {number}")
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
    return _page(title, _STYLE, sub + legend, blocks)


def _page(title: str, style: str, head: str, blocks: list[str]) -> str:
    """The whole document: the title, the style sheet, the text above the blocks, the blocks."""
    return ("<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>{escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n{head}\n" + "\n".join(blocks) + "\n</body>\n</html>\n")


def write_html(path: str | os.PathLike, rows: Iterable[HtmlRow], **kwargs) -> Path:
    """Write :func:`render_html` to ``path`` (through a temporary file and a rename); returns the path."""
    return _write_page(path, render_html(rows, **kwargs))


def _write_page(path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def rows_from_table(table, special_ids: Iterable[int] = ()) -> list[HtmlRow]:
    """HtmlRows from a job's results (a pyarrow Table or a list of dicts with the job's output columns);
    ``special_ids``: the tokenizer's special token ids (``gim_fast.chat.special_token_ids``), kept off the colour
    scale."""
    records = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    special_ids = set(special_ids)
    return [HtmlRow(r["tokens"], r["scores"], label=f"id {r['id']} (line {r['line']})", target=r["target"],
                    target_logit=r["target_logit"], token_ids=r["token_ids"],
                    special=_special_flags(r, r["token_ids"], special_ids)) for r in records]


def _special_flags(record: dict, ids, special_ids: set) -> list[bool]:
    """A job row's special tokens: the tokenizer's, and a chat template's (its ``template`` column, --chat)."""
    template = record.get("template") or [False] * len(record["token_ids"])
    flags = [i in special_ids for i in ids]
    return [f or (j < len(template) and bool(template[j])) for j, f in enumerate(flags)]


# ------------------------------------------------------------------------------------------ answers × sources

_ANSWER_STYLE = """
.av { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 2px; }
.av .srcs { order: 0; flex-basis: 100%; margin-bottom: 0.6em; }
.av .alabel { order: 1; color: #666; font-size: 0.85em; margin-right: 0.5em; }
.av .ans { order: 2; padding: 2px 3px; border: 1px dashed #999; border-radius: 3px; cursor: default;
           font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 15px; }
.av .ans:hover, .av .ans:focus, .av .ans:target { outline: 2px solid #333; }
.srcs .src { background-color: var(--t, transparent); border-radius: 2px; }
table.hm { border-collapse: collapse; margin-top: 1em; font-size: 12px; }
table.hm th, table.hm td { border: 1px solid #eee; padding: 2px 4px; }
table.hm th { font-family: ui-monospace, Menlo, Consolas, monospace; font-weight: normal; white-space: pre; }
table.hm td.lab { max-width: 28em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
table.hm td.v { min-width: 1.6em; }
"""
HEATMAP_MAX_SOURCES = 200


@dataclass
class AnswerView:
    """An answer attributed to sources: ``scores[m][j]`` is answer token m's score of source j.

    Sources are documents (``attribute_context``) or prompt tokens (``explain_answer``); ``joiner`` is written
    between them in the text view ("" for tokens, which carry their own spaces; a newline for documents).
    ``heatmap``: also draw the sources × answer tokens table (default: when there are at most
    ``HEATMAP_MAX_SOURCES`` sources). ``special``: one flag per source (special tokens such as ``<bos>``): left
    uncoloured, with a dashed outline, and off the colour scale."""

    sources: Sequence[str]
    answer_tokens: Sequence[str]
    scores: Sequence[Sequence[float]]
    label: str = ""
    source_labels: Sequence[str] | None = None
    joiner: str = "\n"
    heatmap: bool | None = None
    meta: dict = field(default_factory=dict)
    special: Sequence[bool] | None = None


def _matrix(scores, rows: int, cols: int, number: int) -> list[list[float]]:
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().tolist()
    elif hasattr(scores, "tolist"):
        scores = scores.tolist()
    out = [[float(v) for v in row] for row in scores]
    if len(out) != rows or any(len(r) != cols for r in out):
        raise ValueError(f"view {number}: scores must be [answer tokens ({rows}), sources ({cols})], got "
                         f"{len(out)} rows of lengths {sorted({len(r) for r in out})}")
    return out


def _answer_view_html(view: AnswerView, number: int) -> str:
    sources, answer = [str(s) for s in view.sources], [str(t) for t in view.answer_tokens]
    scores = _matrix(view.scores, len(answer), len(sources), number)
    total = [sum(col) for col in zip(*scores)] if scores else [0.0] * len(sources)
    special = list(view.special) if view.special is not None else [False] * len(sources)
    try:
        peaks = [display_peak(row, special) for row in scores]
        total_peak = display_peak(total, special)
    except ValueError as e:
        raise ValueError(f"view {number}: {e}") from None
    off_scale = [flag and not all(special) for flag in special]   # every source special: they are the scale
    labels = list(view.source_labels) if view.source_labels is not None else sources
    # each source carries its colour for every answer token (--a<m>) and for the whole answer (--t); the page's
    # CSS picks --a<m> while answer token m is hovered, focused or the URL's #fragment
    spans = []
    for j, text in enumerate(sources):
        tip = f"{_printable(labels[j])} | whole answer {total[j]:+.6g}"
        if off_scale[j]:
            spans.append(f'<span class="src special" title="{escape(tip)} | special token: not on the colour scale">'
                         f"{_token_html(text)}</span>")
            continue
        props = [f"--t: {_colour(total[j], total_peak)}"]
        props += [f"--a{m}: {_colour(row[j], peaks[m])}" for m, row in enumerate(scores) if row[j] != 0]
        spans.append(f'<span class="src" style="{"; ".join(props)}" title="{escape(tip)}">{_token_html(text)}</span>')
    joiner = "<br/>".join(escape(_printable(part), quote=False) for part in view.joiner.split("\n"))
    answer_spans = "".join(
        f'<span class="ans a{m}" id="v{number}a{m}" tabindex="0" '
        f'title="{escape(f"answer token {m}: {_printable(repr(t))}")}">{_token_html(t)}</span>'
        for m, t in enumerate(answer))
    body = (f'<div class="av tokens">{answer_spans}<span class="alabel">answer (point at a token):</span>'
            f'<div class="srcs">{joiner.join(spans)}</div></div>')
    heatmap = _draws_heatmap(view)
    table = ""
    if not heatmap:
        why = (f"{plural(len(sources), 'source')}, more than {HEATMAP_MAX_SOURCES}" if view.heatmap is None
               else "heatmap=False")
        table = (f'<p class="legend nohm">The sources × answer tokens table is left out ({why}; '
                 "AnswerView(heatmap=True) draws it): point at an answer token to colour the sources.</p>")
    if heatmap:
        head = "".join(f'<th title="answer token {m}">{_token_html(t)}</th>' for m, t in enumerate(answer))
        rows = []
        for j in range(len(sources)):
            colour = (lambda _score, _peak: "transparent") if off_scale[j] else _colour
            cells = "".join(
                f'<td class="v c{m}" style="background-color: {colour(row[j], peaks[m])}" '
                f'title="{escape(f"{_printable(repr(answer[m]))} ← {_printable(labels[j])}: {row[j]:+.6g}")}"></td>'
                for m, row in enumerate(scores))
            rows.append(f'<tr><td class="lab" title="{escape(_printable(sources[j]))}">'
                        f'{escape(_label_text(labels[j]), quote=False)}</td>'
                        f'{cells}<td class="v" style="background-color: {colour(total[j], total_peak)}" '
                        f'title="whole answer: {total[j]:+.6g}"></td></tr>')
        table = (f'<table class="hm"><tr><th>source</th>{head}<th>whole answer</th></tr>' + "".join(rows)
                 + "</table>")
    meta = [plural(len(sources), "source"), plural(len(answer), "answer token")]
    meta += [escape(f"{k} {v}") for k, v in view.meta.items()]
    heading = _heading_html(view.label or f"answer {number}")
    return (f'<section class="row">\n<h2>{heading} <span class="meta">— {" · ".join(meta)}</span></h2>\n'
            f"{body}\n{table}\n</section>")


def _draws_heatmap(view: AnswerView) -> bool:
    return view.heatmap if view.heatmap is not None else len(view.sources) <= HEATMAP_MAX_SOURCES


def render_answer_html(views: Iterable[AnswerView], *, title: str = "Which sources the answer came from",
                       subtitle: str = "") -> str:
    """A self-contained page (no scripts, nothing loaded; well-formed XML markup) with one block per answer: the
    sources coloured by their score for the whole answer, and, while the pointer is on an answer token (or it
    has the keyboard focus, or its id is the URL's #fragment), by their score for that token; below, the sources ×
    answer tokens heatmap. Colours are relative to each answer token's largest |score| (green raises its target,
    red lowers it)."""
    views = list(views)
    blocks = [_answer_view_html(v, n) for n, v in enumerate(views, start=1)]
    longest = max((len(v.answer_tokens) for v in views), default=0)
    # answer token m hovered, focused or the URL's #fragment, or a heatmap cell of its column hovered: the sources
    # take their colour for m (:has() finds the hovered cell below the sources)
    rules = "".join(f".a{m}:hover ~ .srcs .src, .a{m}:focus ~ .srcs .src, .a{m}:target ~ .srcs .src, "
                    f"section.row:has(td.c{m}:hover) .srcs .src "
                    f"{{ background-color: var(--a{m}, transparent); }}\n" for m in range(longest))
    sub = f'<p class="legend">{escape(subtitle)}</p>\n' if subtitle else ""
    cells = " or a cell" if any(_draws_heatmap(v) for v in views) else ""
    legend = ('<p class="legend">Sources are coloured by their score for the whole answer; point at an answer token '
              f"{'(or a cell of its column) ' if cells else ''}to colour them by their score for that token alone. "
              "Green raises the answer's target, red lowers it; strength is relative to the largest |score|, special "
              f"tokens (dashed outline) left out. Hover a source{cells} for its exact score.</p>")
    return _page(title, _STYLE + _ANSWER_STYLE + rules, sub + legend, blocks)


def write_answer_html(path: str | os.PathLike, views: Iterable[AnswerView], **kwargs) -> Path:
    """Write :func:`render_answer_html` to ``path`` (through a temporary file and a rename); returns the path."""
    return _write_page(path, render_answer_html(views, **kwargs))


def answer_views_from_table(table, special_ids: Iterable[int] = ()) -> list[AnswerView]:
    """AnswerViews from an answer job's results (a pyarrow Table or a list of dicts with the job's answer columns):
    the text's tokens and the answer's earlier tokens are the sources of each answer token; ``special_ids`` as for
    :func:`rows_from_table`."""
    records = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    special_ids = set(special_ids)
    return [AnswerView(sources=[*r["tokens"], *r["answer_tokens"]], answer_tokens=r["answer_tokens"],
                       scores=r["scores"], label=f"id {r['id']} (line {r['line']}): answer {r['answer']!r}",
                       joiner="", special=_special_flags(r, [*r["token_ids"], *r["answer_ids"]], special_ids))
            for r in records]
