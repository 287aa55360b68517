"""MkDocs hooks: the results tables of the docs are read from bench/results when the site is built.

A page writes a directive on a line of its own, and the build replaces it:

``{{ results_table("faithfulness/faithfulness.md", "## The paper's metrics") }}``
    the first Markdown table after that heading (or the file's first table without one) of a file in bench/results;
``{{ results_csv("circuits/ioi-smollm2-135m/summary.csv", ["method", "level", "cpr", "cmd"]) }}``
    a CSV file of bench/results (those columns, in that order; all without a list) as a Markdown table;
``{{ results_text("compile_report.md") }}``
    a whole Markdown file of bench/results, its headings moved two levels down.

A directive whose file or heading is missing fails the build (an error, also without ``--strict``). The images
under bench/results and examples/ are added to the site as ``results/...`` and ``examples/...``, so pages link
them there.
"""
from __future__ import annotations

import ast
import csv
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
_DIRECTIVE = re.compile(r"^\{\{\s*(results_table|results_csv|results_text)\((.*)\)\s*\}\}\s*$", re.M)
_IMAGES = (".png", ".svg", ".jpg")


def _result(path: str) -> Path:
    file = (RESULTS / path).resolve()
    if not file.is_file() or RESULTS.resolve() not in file.parents:
        raise PluginError(f"docs: no results file bench/results/{path}")
    return file


def _tables(lines: list[str]) -> list[tuple[int, list[str]]]:
    """(first line, lines) of every Markdown table: a header row followed by a |---| separator row."""
    found, i = [], 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            found.append((i, lines[i:j]))
            i = j
        else:
            i += 1
    return found


def results_table(path: str, heading: str | None = None) -> str:
    lines = _result(path).read_text(encoding="utf-8").splitlines()
    start = 0
    if heading is not None:
        matches = [i for i, line in enumerate(lines) if line.strip() == heading.strip()]
        if not matches:
            raise PluginError(f"docs: bench/results/{path} has no heading {heading!r}")
        start = matches[0]
    tables = [t for t in _tables(lines) if t[0] > start]
    if not tables:
        raise PluginError(f"docs: bench/results/{path} has no table after {heading!r}")
    return "\n".join(tables[0][1])


def _cell(value: str) -> str:
    """A CSV value as a table cell: numbers with more than three decimals rounded to three, the rest as written."""
    try:
        number = float(value)
    except ValueError:
        return value.replace("|", "\\|")
    decimals = value.partition(".")[2]
    if len(decimals) <= 3 or "e" in value.lower():
        return value
    return f"{number:.3f}"


def results_csv(path: str, columns: list[str] | None = None) -> str:
    with _result(path).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PluginError(f"docs: bench/results/{path} has no rows")
    columns = columns or list(rows[0])
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise PluginError(f"docs: bench/results/{path} has no column {missing}")
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(out)


def results_text(path: str) -> str:
    text = _result(path).read_text(encoding="utf-8")
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + 2) + " ", text, flags=re.M)


_FUNCTIONS = {"results_table": results_table, "results_csv": results_csv, "results_text": results_text}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        args = ast.literal_eval(f"({match.group(2)},)")
        return _FUNCTIONS[match.group(1)](*args)
    return _DIRECTIVE.sub(replace, markdown)


def on_files(files, config):
    """The result plots and the example pictures, as files of the site."""
    site = config["site_dir"]
    for folder, prefix in ((RESULTS, "results"), (ROOT / "examples", "examples")):
        for path in sorted(folder.rglob("*")):
            if path.suffix in _IMAGES:
                rel = Path(prefix) / path.relative_to(folder)
                files.append(File(rel.as_posix(), str(folder.parent), site, config["use_directory_urls"]))
    return files
