"""Attribution scores as text: one line per token with its score and a bar, for terminals and logs; and counts in
messages ("1 token", "2 tokens")."""
from __future__ import annotations

import math
import os
import sys
import unicodedata

__all__ = ["format_attributions", "format_answer", "format_summary", "top_positions", "plural", "display_peak",
           "LONG_INPUT"]

# From this many tokens on, the command line prints the top tokens and a summary instead of one line per token.
LONG_INPUT = 200

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
                        special=None, only=None) -> str:
    """Format one attribution score per token as lines of ``position  token  score  bar``.

    ``tokens`` are the token strings as text (decode each id, e.g. ``[tok.decode([i]) for i in ids]``);
    spaces show as '·', newlines and tabs as ``\\n``/``\\t``, other unprintable characters as Python escapes.
    ``scores`` is a list, a NumPy array or a torch tensor of the same length. Scores show with 4 significant
    digits; the bar's length is ``width * |score| / max|score|`` in eighth-of-a-cell steps. ``special``: one flag
    per token marking special tokens (``<bos>``, ...; ``gim_fast.chat.special_mask(tok, ids)``): they are
    left out of max|score| and show their exact score with ``(special)`` instead of a bar, so that a large score
    on <bos> does not flatten the bars of the real tokens. With ``color``
    the bar is green for a positive score and red for a negative one (ANSI escapes); ``None`` means color when
    standard output is a terminal and ``NO_COLOR`` is not set. ``only``: the positions to print (e.g.
    :func:`top_positions` of a long input), in the order given; each keeps its position number, and the bars keep the
    scale of the whole input. Returns the lines joined by newlines, with no trailing newline.
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

    flags = list(special) if special is not None else [False] * len(values)
    if len(flags) != len(values):
        raise ValueError(f"special has {len(flags)} flags for {len(values)} scores; give one per token")
    rows = list(range(len(values))) if only is None else [int(i) for i in only]
    if any(not 0 <= i < len(values) for i in rows):
        raise ValueError(f"only: positions must lie in [0, {len(values)})")
    if not rows:
        return ""
    shown = [_visible(str(t)) for t in tokens]
    token_cells = min(max(_cells(shown[i]) for i in rows), _MAX_TOKEN_CELLS)
    index_cells = len(str(len(values) - 1))
    texts = [f"{v:+.4g}" if not math.isnan(v) else "nan" for v in values]
    score_cells = max(len(texts[i]) for i in rows)
    peak = display_peak(values, flags)
    scaled_all = all(flags)          # every token special: they are the scale

    lines = []
    for i in rows:
        token, value, text = shown[i], values[i], texts[i]
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


def top_positions(scores, k: int, special=None) -> list[int]:
    """The positions of the ``k`` largest |scores| among the tokens that are not special (all tokens when every
    one is), in position order."""
    values = _as_floats(scores)
    flags = list(special) if special is not None else [False] * len(values)
    pool = [i for i in range(len(values)) if not flags[i]] or list(range(len(values)))
    ranked = sorted(pool, key=lambda i: (-(abs(values[i]) if math.isfinite(values[i]) else math.inf), i))
    return sorted(ranked[:k])


def format_summary(scores, special=None) -> str:
    """One line about all the scores of an input: how many tokens, the sum, the positive and negative parts, and
    how many special tokens are left out of them."""
    values = _as_floats(scores)
    flags = list(special) if special is not None else [False] * len(values)
    real = [v for v, f in zip(values, flags) if not f and math.isfinite(v)]
    left_out = sum(flags)
    extra = f" ({plural(left_out, 'special token')} left out)" if left_out else ""
    return (f"{plural(len(values), 'token')}: sum {sum(real):+.4g} = positive {sum(v for v in real if v > 0):+.4g} "
            f"+ negative {sum(v for v in real if v < 0):+.4g}{extra}")


def format_answer(tokens: list[str], answer_tokens: list[str], scores, values, *, top: int = 3,
                  color: bool | None = None) -> str:
    """One line per answer token: ``position  token  value  top sources``, the sources being the ``top``
    highest-scored of ``tokens`` (the prompt's tokens, then the answer's own, which later answer tokens may
    depend on) with their position and score, e.g. ``·France (3) +1.07``.

    ``scores``: ``[M, len(tokens)]`` (``explain_answer``'s ``.scores``); ``values``: the M explained values (each
    answer token's logit or log-probability). Positions counted from 0 over ``tokens``; an answer token's own and
    later positions (score 0) are never listed. With ``color`` a score is green when positive, red when negative.
    """
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu()
    rows = [_as_floats(row) for row in scores]
    values = _as_floats(values)
    answer_tokens = list(answer_tokens)
    if len(rows) != len(answer_tokens) or len(values) != len(answer_tokens):
        raise ValueError(f"got {len(answer_tokens)} answer tokens, {len(rows)} score rows and {len(values)} values")
    if any(len(r) != len(tokens) for r in rows):
        raise ValueError(f"every score row needs one score per token ({len(tokens)})")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    if color is None:
        color = _auto_color()
    prompt = len(tokens) - len(answer_tokens)
    shown = [_visible(str(t)) for t in answer_tokens]
    token_cells = min(max((_cells(s) for s in shown), default=1), _MAX_TOKEN_CELLS)
    index_cells = len(str(max(len(answer_tokens) - 1, 0)))
    texts = [f"{v:.4g}" for v in values]
    value_cells = max((len(t) for t in texts), default=1)
    lines = []
    for m, (token, text, row) in enumerate(zip(shown, texts, rows)):
        visible = row[:prompt + m]                          # what answer token m can depend on
        order = sorted(range(len(visible)), key=lambda j: (-visible[j], j))[:top]
        parts = []
        for j in order:
            score = f"{visible[j]:+.3g}"
            if color:
                score = (_GREEN if visible[j] > 0 else _RED) + score + _RESET
            where = f"{j}" if j < prompt else f"answer {j - prompt}"
            parts.append(f"{_visible(str(tokens[j]))} ({where}) {score}")
        lines.append(f"{m:>{index_cells}}  {_fit(token, token_cells)}  {text:>{value_cells}}  ← "
                     + ", ".join(parts))
    return "\n".join(lines)
