"""Attribution scores as text: one line per token with its score and a bar, for terminals and logs; and counts in
messages ("1 token", "2 tokens")."""
from __future__ import annotations

import math
import os
import sys
import unicodedata

__all__ = ["format_attributions", "plural", "display_peak"]

_FULL = "█"
_PARTIAL = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")   # 0/8 .. 7/8 of a cell
_RED, _GREEN, _RESET = "\x1b[31m", "\x1b[32m", "\x1b[0m"
_MAX_TOKEN_CELLS = 24
_ESCAPES = {" ": "·", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def plural(count: int, noun: str) -> str:
    """``"1 token"``, ``"2 tokens"``, ``"0 batches"``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def display_peak(values: list[float], special=None) -> float:
    """The |score| that fills a bar or a colour: the largest finite |score| among the tokens that are not special
    (``special``: one flag per token, e.g. <bos>, whose score can dwarf the real tokens'); among all tokens when
    every token is special."""
    flags = list(special) if special is not None else [False] * len(values)
    if len(flags) != len(values):
        raise ValueError(f"special has {len(flags)} flags for {len(values)} scores; give one per token")
    ordinary = [abs(v) for v, s in zip(values, flags) if not s and math.isfinite(v)]
    if ordinary or not any(flags):
        return max(ordinary, default=0.0)
    return max((abs(v) for v in values if math.isfinite(v)), default=0.0)


def _cells(text: str) -> int:
    """Terminal columns ``text`` takes (wide East Asian characters take two; combining marks none)."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _visible(token: str) -> str:
    """The token with whitespace made visible ('·' for a space) and other unprintable characters escaped."""
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])   # '\x00', '\u200b', '\xa0', ...
    return "".join(out)


def _fit(text: str, cells: int) -> str:
    """Pad ``text`` to exactly ``cells`` columns, cutting it with '…' when longer."""
    if _cells(text) > cells:
        cut, used = [], 0
        for ch in text:
            w = _cells(ch)
            if used + w > cells - 1:
                break
            cut.append(ch)
            used += w
        text = "".join(cut) + "…"
    return text + " " * (cells - _cells(text))


def _bar(fraction: float, width: int) -> str:
    eighths = int(round(min(max(fraction, 0.0), 1.0) * width * 8))
    return _FULL * (eighths // 8) + _PARTIAL[eighths % 8]


def _as_floats(scores) -> list[float]:
    if hasattr(scores, "detach"):          # a torch tensor, on any device, in any float dtype
        scores = scores.detach().float().cpu()
    if hasattr(scores, "tolist"):          # torch tensors and numpy arrays
        scores = scores.tolist()
    values = list(scores) if not isinstance(scores, (int, float)) else [scores]
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            raise ValueError("scores must be one-dimensional (one score per token); "
                             "for a batch, format each row separately")
        out.append(float(v) + 0.0)   # + 0.0 turns -0.0 into 0.0
    return out


def _auto_color() -> bool:
    # https://no-color.org: NO_COLOR set to a non-empty value turns color off.
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def format_attributions(tokens: list[str], scores, *, color: bool | None = None, width: int = 40,
                        special=None) -> str:
    """Format one attribution score per token as lines of ``position  token  score  bar``.

    ``tokens`` are the token strings as text (decode each id, e.g. ``[tok.decode([i]) for i in ids]``);
    spaces show as '·', newlines and tabs as ``\\n``/``\\t``, other unprintable characters as Python escapes.
    ``scores`` is a list, a NumPy array or a torch tensor of the same length. Scores show with 4 significant
    digits; the bar's length is ``width * |score| / max|score|`` in eighth-of-a-cell steps. ``special``: one flag
    per token marking special tokens (``<bos>``, ...; e.g. ``[i in tok.all_special_ids for i in ids]``): they are
    left out of max|score| and show their exact score with ``(special)`` instead of a bar, so that a large score
    on <bos> does not flatten the bars of the real tokens. With ``color``
    the bar is green for a positive score and red for a negative one (ANSI escapes); ``None`` means color when
    standard output is a terminal and ``NO_COLOR`` is not set. Returns the lines joined by newlines, with no
    trailing newline.
    """
    values = _as_floats(scores)
    tokens = list(tokens)
    if len(tokens) != len(values):
        raise ValueError(f"got {len(tokens)} tokens but {len(values)} scores")
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be an int >= 0, got {width!r}")
    if color is None:
        color = _auto_color()
    if not values:
        return ""

    shown = [_visible(str(t)) for t in tokens]
    token_cells = min(max(_cells(s) for s in shown), _MAX_TOKEN_CELLS)
    index_cells = len(str(len(values) - 1))
    texts = [f"{v:+.4g}" if not math.isnan(v) else "nan" for v in values]
    score_cells = max(len(t) for t in texts)
    flags = list(special) if special is not None else [False] * len(values)
    peak = display_peak(values, flags)
    scaled_all = all(flags)          # every token special: they are the scale

    lines = []
    for i, (token, value, text) in enumerate(zip(shown, values, texts)):
        if flags[i] and not scaled_all:
            lines.append(f"{i:>{index_cells}}  {_fit(token, token_cells)}  {text:>{score_cells}}  (special)")
            continue
        if math.isnan(value):
            fraction = 0.0
        elif math.isinf(value):
            fraction = 1.0
        else:
            fraction = abs(value) / peak if peak > 0 else 0.0
        bar = _bar(fraction, width)
        if color and bar:
            bar = (_GREEN if value > 0 else _RED) + bar + _RESET
        line = f"{i:>{index_cells}}  {_fit(token, token_cells)}  {text:>{score_cells}}  {bar}"
        lines.append(line.rstrip())
    return "\n".join(lines)
