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
