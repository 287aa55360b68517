"""The HTML view: well-formed, self-contained, escaped, coloured by score; rendered by a real headless browser
(Debian's chromium) when one is installed."""
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import pytest
import torch

from gim_fast.html import HtmlRow, render_html, rows_from_table, write_html

ROWS = [
    HtmlRow(["The", " capital", " of", " France", " is"], [0.25, 0.23, -0.15, 1.07, 2.89], label="France",
            target=" Paris", target_logit=17.37, token_ids=[504, 3575, 282, 4649, 314]),
    HtmlRow(["<b>", "&amp;", "\"q\"", "line\nbreak", "", "\x00\x1b", "\ud800"], torch.tensor([-1.0, 0.5, 0, 2, 1, 0, 0]),
            label="<script>alert(1)</script>", target="</span>"),
]


def _parse(page: str) -> ET.Element:
    assert page.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(page.split("\n", 1)[1])         # XML-parsable markup: tags balanced, entities escaped


def test_well_formed_and_self_contained():
    page = render_html(ROWS, title="t & t")
    root = _parse(page)
    assert root.tag == "html" and root.find("head/meta").get("charset") == "utf-8"
    for pattern in (r"<script", r"<link", r"<img", r"<iframe", r"\bsrc=", r"\bhref=", r"url\(", r"@import",
                    r"https?:", r"//[a-z]"):
        assert not re.search(pattern, page, re.IGNORECASE), pattern   # nothing loaded from anywhere
    spans = [s for s in root.iter("span") if s.get("class") == "tok"]
    assert len(spans) == 12
    first = spans[0]
    assert first.get("title") == "score +0.25 | token 'The' (id 504) | position 0"
    assert first.get("data-score") == "0.25" and "rgba(22, 163, 74" in first.get("style")
    assert "rgba(220, 38, 38" in spans[2].get("style")                # negative: red
    assert spans[4].get("style").endswith("0.8)")                     # the row's largest |score|: strongest
    assert "".join(spans[3].itertext()) == " France"
    assert "".join(spans[5].itertext()) == "<b>" and "".join(spans[8].itertext()) == "line↵break"
    assert "".join(spans[10].itertext()) == "\\x00\\x1b"              # control characters made visible
    headings = [h for h in root.iter("h2")]
    assert "".join(headings[1].itertext()).startswith("<script>alert(1)</script>")
    assert "target ' Paris' · logit 17.37 · 5 tokens" in "".join(headings[0].itertext())


def test_write_html_and_rows_from_results(tmp_path):
    table = [{"id": "x", "line": 3, "tokens": ["a", "b"], "scores": [1.0, -2.0], "target": "c",
              "target_logit": 1.5, "token_ids": [1, 2]}]
    path = write_html(tmp_path / "r.html", rows_from_table(table))
    page = path.read_text(encoding="utf-8")
    _parse(page)
    assert "id x (line 3)" in page and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        render_html([HtmlRow(["a", "b"], [1.0])])


def _png_pixels(data: bytes):
    """(width, height, rows of RGB(A) tuples) of a non-interlaced 8-bit RGB/RGBA PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0
    bpp = 3 if colour == 2 else 4
    raw, stride, out, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(bytes(line))
        prev = line
    return width, height, bpp, out


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless chromium installed (apt-get install chromium)")
def test_renders_in_headless_chromium(tmp_path):
    page = write_html(tmp_path / "page.html", ROWS[:1] * 3, title="GIM attributions")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=800,500", "--hide-scrollbars"]
    done = subprocess.run([*cmd, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    width, height, bpp, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (800, 500)
    green = red = 0
    for line in rows[::2]:
        for x in range(0, width * bpp, bpp * 2):
            r, g, b = line[x], line[x + 1], line[x + 2]
            green += g > r + 40 and g > b + 40
            red += r > g + 40 and r > b + 40
    assert green > 200 and red > 20               # the tokens really are painted green and red
    dom = subprocess.run([*cmd, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="tok"') == 15 and "France" in dom


# ------------------------------------------------------------------------------------------ answers × sources

from gim_fast.html import AnswerView, render_answer_html, write_answer_html  # noqa: E402

# answer token 0 rests on source 0 (green), answer token 1 pushes against source 1 (red)
VIEW = AnswerView(sources=["The capital of Peru is Lima.", "Bananas are <yellow> & long."],
                  answer_tokens=[" Lima", "\n"], scores=[[2.0, 0.0], [0.0, -1.5]], label="Where is Lima?")


def test_answer_view_is_well_formed_and_self_contained():
    page = render_answer_html([VIEW, AnswerView(["a", "b", "c"], ["x"], torch.tensor([[1.0, -1.0, 0.5]]),
                                                joiner="", heatmap=False)], title="t")
    root = _parse(page)
    for pattern in (r"<script", r"<link", r"<img", r"\bsrc=", r"\bhref=", r"url\(", r"@import", r"https?:"):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    sources = [s for s in root.iter("span") if s.get("class") == "src"]
    answers = [s for s in root.iter("span") if (s.get("class") or "").startswith("ans ")]
    assert len(sources) == 5 and [a.get("id") for a in answers] == ["v1a0", "v1a1", "v2a0"]
    assert "".join(sources[1].itertext()) == "Bananas are <yellow> & long."
    # each source carries its colour for every answer token it matters to, and for the whole answer
    style = sources[0].get("style")
    assert "--a0: rgba(22, 163, 74, 0.8)" in style and "--a1" not in style and "--t: rgba(22, 163, 74" in style
    assert "--a1: rgba(220, 38, 38, 0.8)" in sources[1].get("style")
    css = root.find("head/style").text
    for m in (0, 1):   # one rule per answer position, shared by every view
        assert (f".a{m}:hover ~ .srcs .src, .a{m}:focus ~ .srcs .src, .a{m}:target ~ .srcs .src, "
                f"section.row:has(td.c{m}:hover) .srcs .src {{ background-color: var(--a{m}, transparent); }}") in css
    tables = list(root.iter("table"))
    assert len(tables) == 1 and len(tables[0].findall("tr")) == 3          # the first view's heatmap only
    with pytest.raises(ValueError, match=r"scores must be \[answer tokens \(2\), sources \(2\)\]"):
        render_answer_html([AnswerView(["a", "b"], ["x", "y"], [[1.0, 2.0]])])


def _screenshot(page, fragment: str, tmp_path):
    shot = tmp_path / f"{fragment}.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,300", "--hide-scrollbars",
           f"--screenshot={shot}", page.as_uri() + f"#{fragment}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    width, height, bpp, rows = _png_pixels(shot.read_bytes())
    green = red = 0
    for line in rows:
        for x in range(0, width * bpp, bpp):
            r, g, b = line[x], line[x + 1], line[x + 2]
            green += g > r + 40 and g > b + 40
            red += r > g + 40 and r > b + 40
    return green, red


@pytest.mark.skipif(_chromium() is None, reason="no headless chromium installed (apt-get install chromium)")
def test_pointing_at_an_answer_token_recolours_the_sources_in_headless_chromium(tmp_path):
    # the URL's #fragment selects an answer token like the pointer does (:target and :hover share the rule)
    view = AnswerView(VIEW.sources, VIEW.answer_tokens, VIEW.scores, heatmap=False)
    page = write_answer_html(tmp_path / "answer.html", [view], title="x")
    green0, red0 = _screenshot(page, "v1a0", tmp_path)
    green1, red1 = _screenshot(page, "v1a1", tmp_path)
    assert green0 > 1000 and red1 > 1000                 # token 0: source 0 green; token 1: source 1 red
    assert green1 < green0 / 10 and red0 < red1 / 10     # and not the other way round
