"""The README is a front page and the docs' results tables come from bench/results (the site itself is built by
``make docs``, with ``--strict``, in CI)."""
import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_a_front_page():
    assert README.count("\n") <= 300
    for command in ("make demo", "make test"):
        assert command in README
    assert "**The root never hides an installed package.**" in README


def test_readme_links_lead_to_files():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_layout_names_what_is_at_the_root():
    block = README.split("## Layout", 1)[1].split("```")[1]
    named = {line.split()[0].rstrip("/") for line in block.splitlines() if line and not line.startswith(" ")}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in ("site", "build", "dist") and not p.name.endswith(".egg-info")}
    assert folders <= named, folders - named


@pytest.fixture(scope="module")
def hooks():
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_directive_reads_its_file(hooks):
    found = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for name, args in re.findall(r"^\{\{\s*(results_\w+)\((.*)\)\s*\}\}\s*$", page.read_text(encoding="utf-8"),
                                     flags=re.M):
            table = getattr(hooks, name)(*ast.literal_eval(f"({args},)"))
            assert table.startswith("|") or name == "results_text", (page.name, args)
            found += 1
    assert found >= 10


def test_results_table_takes_the_table_after_the_heading(hooks, tmp_path, monkeypatch):
    (tmp_path / "r.md").write_text("# x\n\n| a |\n|---|\n| 1 |\n\n## B\n\ntext\n\n| b | c |\n|---|---:|\n| 2 | 3 |\n",
                                   encoding="utf-8")
    monkeypatch.setattr(hooks, "RESULTS", tmp_path)
    assert hooks.results_table("r.md") == "| a |\n|---|\n| 1 |"
    assert hooks.results_table("r.md", "## B") == "| b | c |\n|---|---:|\n| 2 | 3 |"
    with pytest.raises(Exception, match="no heading"):
        hooks.results_table("r.md", "## C")
    with pytest.raises(Exception, match="no results file"):
        hooks.results_table("missing.md")
