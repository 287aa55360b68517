"""Every HTML view in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright, one browser for
the module. Each page loads without a console error or an uncaught exception, and pointing at things does what the
legend says: a token shows its score, an answer token or a heatmap cell recolours the sources, the circuit's slider
redraws the circuit, a node or an edge shows its name and exact score.

Skipped, with the reason, only when no Chromium is installed (``apt-get install chromium``); under CI (``CI`` set)
a missing browser fails instead, since ``.ci/run`` installs it. With ``GIM_FAST_SCREENSHOTS=DIR`` each view's
screenshot is also written to DIR (the pictures in docs/img were made so:
``GIM_FAST_SCREENSHOTS=docs/img .venv/bin/python -m pytest tests/browser``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import gim_fast
from gim_fast.html import AnswerView, HtmlRow, write_answer_html, write_html

from jobs_support import write_jsonl

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium under CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no headless chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright   # the test extra; never downloads a browser of its own

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


class Page:
    """A page opened in the browser, collecting console errors and uncaught exceptions."""

    def __init__(self, browser, path: Path, width: int = 1100, height: int = 700):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        self.page.route("**/*", self._local_only)          # self-contained: nothing is fetched, nothing leaves
        self.page.goto(path.resolve().as_uri())

    def _local_only(self, route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "about:")):
            route.continue_()
        else:
            self.errors.append(f"loaded {url}")
            route.abort()

    def background(self, selector: str, nth: int = 0) -> str:
        return self.page.locator(selector).nth(nth).evaluate("e => getComputedStyle(e).backgroundColor")

    def shot(self, name: str) -> None:
        folder = os.environ.get("GIM_FAST_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.mouse.move(0, 0)
            self.page.screenshot(path=str(Path(folder) / f"{name}.png"))

    def close(self) -> None:
        assert not self.errors, self.errors
        self.page.close()


def _rgb(css: str) -> tuple[float, ...]:
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return tuple(values[:3]) + ((values[3],) if len(values) > 3 else (1.0,))


def _green(css: str) -> bool:
    r, g, b, a = _rgb(css)
    return a > 0 and g > r + 40 and g > b + 40


def _red(css: str) -> bool:
    r, g, b, a = _rgb(css)
    return a > 0 and r > g + 40 and r > b + 40


# ----------------------------------------------------------------------------------------------------- token view


def test_token_view(browser, smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
    scores = gim_fast.explain(model, ids, tokenizer=tok)
    tokens = [tok.decode([int(i)]) for i in ids]
    path = write_html(tmp_path / "token.html", [HtmlRow(tokens, scores, label="The capital of France is",
                                                        target=" Paris", token_ids=ids.tolist())],
                      title="GIM attributions: smollm2-135m")
    page = Page(browser, path, 900, 260)
    toks = page.page.locator("span.tok")
    assert toks.count() == len(tokens)
    assert all(_green(page.background("span.tok", i)) for i in range(len(tokens)))    # every score > 0 here
    france = toks.nth(3)
    assert france.evaluate("e => getComputedStyle(e).outlineStyle") == "none"
    france.hover()
    assert france.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"       # pointed at: outlined
    assert re.match(r"score \+\d\.\d+ \| token ' France'", france.get_attribute("title"))   # and its exact score
    page.shot("token")
    page.close()


# ----------------------------------------------------------------------------------------------------- answer view


def test_answer_view(browser, smollm2, tmp_path):
    model, tok = smollm2
    prompt = tok("Water boils at 100 degrees. The capital of France is", return_tensors="pt").input_ids[0]
    answer = tok(" Paris, on the Seine", add_special_tokens=False, return_tensors="pt").input_ids[0]
    result = gim_fast.explain_answer(model, prompt, answer, tokenizer=tok)
    view = AnswerView(sources=result.tokens, answer_tokens=result.tokens[len(prompt):], scores=result.scores,
                      label="Water boils at 100 degrees. The capital of France is", joiner="")
    path = write_answer_html(tmp_path / "answer.html", [view], title="GIM attributions of an answer: smollm2-135m")
    page = Page(browser, path, 1000, 520)
    before = [page.background(".srcs .src", j) for j in range(len(result.tokens))]
    for m in (0, 2):
        page.page.locator(f"span.ans.a{m}").hover()
        after = [page.background(".srcs .src", j) for j in range(len(result.tokens))]
        row = result.scores[m]
        assert after != before                                            # the sources are recoloured ...
        for j, score in enumerate(row.tolist()):                          # ... by answer token m's own scores
            if j >= len(prompt) + m:
                assert _rgb(after[j])[3] == 0, (m, j, after[j])           # what m cannot depend on: no colour
            elif score > 0.1 * float(row.abs().max()):
                assert _green(after[j]), (m, j, score, after[j])
            elif score < -0.1 * float(row.abs().max()):
                assert _red(after[j]), (m, j, score, after[j])
        page.page.mouse.move(0, 0)
    # a heatmap cell of answer token 2's column recolours the sources as pointing at the token does
    page.page.locator("span.ans.a2").hover()
    by_token = [page.background(".srcs .src", j) for j in range(len(result.tokens))]
    page.page.mouse.move(0, 0)
    page.page.locator("td.c2").first.hover()
    assert [page.background(".srcs .src", j) for j in range(len(result.tokens))] == by_token
    page.shot("answer")
    page.close()


# ----------------------------------------------------------------------------------------------------- context view


def test_context_view(browser, smollm2, tmp_path):
    model, tok = smollm2
    documents = ["The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
                 "Lima was founded by Francisco Pizarro in 1535.", "The capital of Peru is Lima.",
                 "Bananas are\nyellow."]
    table = gim_fast.attribute_context(model, tok, documents, "What is the capital of Peru?", " Lima")
    path = table.save_html(tmp_path / "context.html")
    page = Page(browser, path, 1000, 560)
    labels = page.page.locator("td.lab").all_inner_texts()
    assert labels == [f"{i}: {d}".replace("\n", "↵") for i, d in enumerate(documents)]
    assert all(page.page.locator("td.lab").nth(i).bounding_box()["height"] > 8 for i in range(len(documents)))
    before = [page.background(".srcs .src", j) for j in range(len(documents))]
    page.page.locator("td.c0").nth(2).hover()                     # answer token 0's cell of source 2
    after = [page.background(".srcs .src", j) for j in range(len(documents))]
    expected = table.token_scores.iloc[0, :len(documents)].to_numpy()
    assert after != before or (table.token_scores.shape[0] == 1)
    top = int(expected.argmax())
    assert _green(after[top]) if expected[top] > 0 else True
    page.shot("context")
    page.close()


def test_long_views_keep_their_colours_on_the_first_screen(browser, tmp_path):
    """A 1,200-token prompt: the heading is one line, so coloured tokens are on the first screen; an answer view
    with more than 200 sources says that its heatmap is left out."""
    tokens = [f" w{i}" for i in range(1200)]
    scores = torch.linspace(-1, 1, 1200)
    path = write_html(tmp_path / "long.html", [HtmlRow(tokens, scores, label="".join(tokens))])
    page = Page(browser, path, 900, 600)
    first = page.page.locator("span.tok").first.bounding_box()
    assert first["y"] < 250                                            # not pushed down by the label
    page.close()
    view = AnswerView(tokens, [" a", " b"], torch.randn(2, 1200), joiner="")
    path = write_answer_html(tmp_path / "long_answer.html", [view])
    page = Page(browser, path, 900, 600)
    assert page.page.locator("table.hm").count() == 0
    assert "left out (1200 sources, more than 200" in page.page.inner_text("p.nohm")
    assert "or a cell" not in page.page.inner_text("p.legend >> nth=0")
    page.close()


# ----------------------------------------------------------------------------------------------------- circuit view


@pytest.fixture(scope="module")
def circuit_page(tmp_path_factory):
    """A circuit run's folder from the command line: a tiny random Llama on a two-example task (the page is what is
    tested, not the circuit), with at most 70 edges a method on the page, so that 100 % (126 edges) is listed but
    not drawn."""
    import gim_fast.circuits.html
    from gim_fast.cli import main

    from jobs_support import save_tiny

    folder = tmp_path_factory.mktemp("circuit")
    tiny = save_tiny(folder / "tiny")
    task = write_jsonl(folder / "task.jsonl", [{"clean": "ab", "corrupt": "cd", "answer": "x", "corrupt_answer": "y"},
                                              {"clean": "ef", "corrupt": "gh", "answer": "z", "corrupt_answer": "w"}])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gim_fast.circuits.html, "MAX_DRAWN", 70)
        assert main(["circuit", "--task", str(task), "--model", str(tiny), "--methods", "gim,random", "--levels",
                     "edge", "--percentages", "1", "10", "20", "50", "100", "--min-accuracy", "0", "--out",
                     str(folder / "run"), "--quiet"]) == 0
    return folder / "run" / "circuit.html"


def test_circuit_view(browser, circuit_page):
    page = Page(browser, circuit_page, 1200, 700)
    graph = page.page.locator("#graph")
    drawn = int(graph.get_attribute("data-edges"))
    assert drawn == page.page.locator("#edges path").count()
    sizes = page.page.locator("#levels button")
    assert sizes.all_inner_texts() == ["1%", "10%", "20%", "50%", "100%"]
    assert sizes.nth(4).is_disabled() and not sizes.nth(3).is_disabled()   # more edges than the page holds
    # the slider redraws the circuit: more edges at 50 % than at 10 %
    slider = page.page.locator("#fraction")
    slider.evaluate("e => { e.value = 1; e.dispatchEvent(new Event('input')); }")
    small = page.page.locator("#edges path").count()
    assert page.page.inner_text("#size").startswith("10% of 126 edges")
    slider.evaluate("e => { e.value = 3; e.dispatchEvent(new Event('input')); }")
    large = page.page.locator("#edges path").count()
    assert 0 < small < large <= 63 and page.page.inner_text("#size").startswith("50% of 126 edges")
    assert page.page.locator("#marker").count() == 1
    sizes.nth(1).click()                                       # the buttons do what the slider does
    assert page.page.locator("#edges path").count() == small and slider.input_value() == "1"
    # pointing at a node or an edge shows its name and its exact score
    page.page.locator("circle.node.on").first.hover()
    assert re.match(r"(input|a\d+\.h\d+|m\d+): node score [+-]\d", page.page.inner_text("#info"))
    edge = page.page.locator("#edges path").first
    edge.dispatch_event("mouseenter")
    assert page.page.inner_text("#info").startswith(f"{edge.get_attribute('data-edge')}: edge score ")
    # another method redraws with its own circuit; the tables follow
    page.page.locator("#methods button", has_text="random").click()
    assert page.page.inner_text("#tables-method") == "random"
    assert page.page.locator("#top-edges tr").count() == 21 and "<" in page.page.inner_text("#top-edges")
    page.close()


def test_the_checks_catch_a_page_that_throws_or_fetches(browser, tmp_path):
    """The guard every view passes through can fail: a script error, a console error and a request are caught."""
    page_file = tmp_path / "bad.html"
    page_file.write_text("<!DOCTYPE html><html><body><img src='https://example.invalid/x.png'/>"
                         "<script>console.error('boom'); null.x;</script></body></html>", encoding="utf-8")
    page = Page(browser, page_file, 400, 300)
    page.page.wait_for_timeout(200)
    assert any(e.startswith("console: boom") for e in page.errors)
    assert any(e.startswith("exception:") for e in page.errors)
    assert any(e.startswith("loaded https://example.invalid") for e in page.errors)
    with pytest.raises(AssertionError):
        page.close()
    page.page.close()
