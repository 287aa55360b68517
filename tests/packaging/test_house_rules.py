"""House rules of the code that a reader relies on (issue 21's "done when"), checked over the source tree.

* Code comments and docstrings state what is: no dates, commit hashes or timings (those belong to bench/results
  and the docs, where they are dated).
* GIM's settings are defined once: the per-setting scales are named in settings.py, the code that applies them and
  the public signatures, never in the CLI, the job runner, the circuits or the evaluation, which pass one
  ``GIMSettings`` through.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "gim_fast").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])
SOURCES = [p for p in SOURCES if "kernels" not in p.relative_to(ROOT).parts[1:2]]   # gim_fast/kernels is a link

DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
TIMING = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|seconds|minutes)\b")
# Text that looks like a timing and is not a measurement: an example of a progress line the code prints.
NOT_A_TIMING = {("gim_fast/progress.py", "12 s")}


def _prose(path: Path):
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                for i, line in enumerate(doc.splitlines()):
                    yield node.body[0].lineno + i, line


def _history(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for line, text in _prose(path):
        for what, pattern in (("date", DATE), ("commit hash", COMMIT), ("timing", TIMING)):
            for match in pattern.finditer(text):
                if (rel, match.group(0)) not in NOT_A_TIMING:
                    found.append(f"{rel}:{line}: {what} {match.group(0)!r} in {text.strip()!r}")
    return found


def test_the_scan_sees_sources():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"gim_fast/explain.py", "kernels/attention.py", "kernels/norm.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_comments_and_docstrings_carry_no_history(path):
    assert _history(path) == []


def test_the_history_scan_finds_history(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    sample = tmp_path / "sample.py"
    sample.write_text('"""Measured on 2026-12-01."""\n'
                      "x = 1  # since commit 1a2b3c4d the loop takes 3.5 s\n"
                      "y = 2  # a plain comment about 7 heads\n", encoding="utf-8")
    found = _history(sample)
    assert len(found) == 3 and [f.split(": ")[1].split(" '")[0] for f in found] == ["commit hash", "timing", "date"]


SCALES = ("q_scale", "k_scale", "v_scale", "gate_scale", "up_scale")
PASS_THROUGH = ["gim_fast/cli.py", "gim_fast/cli_args.py", "gim_fast/jobs", "gim_fast/circuits", "gim_fast/evaluate"]


@pytest.mark.parametrize("place", PASS_THROUGH)
def test_the_scales_are_not_spelled_out_where_settings_pass_through(place):
    target = ROOT / place
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    assert files
    named = [f"{p.relative_to(ROOT)}: {s}" for p in files for s in SCALES if s in p.read_text(encoding="utf-8")]
    assert named == []


def test_the_scales_are_settings():
    from gim_fast.settings import GIMSettings

    assert set(SCALES) <= {f.name for f in dataclasses.fields(GIMSettings)}
