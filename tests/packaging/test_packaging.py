"""A regular (non-editable) install works: the wheel holds every subpackage, kernels/ as gim_fast/kernels only.

The wheel is built from a copy of the source (so the tree gets no build/ or egg-info), installed with pip *without*
-e into a fresh virtual environment that cannot see the source tree: its only view of the dependencies is a .pth
line naming this environment's site-packages (a plain path line; the .pth files there, among them the editable
install's finder, are not processed). From a temporary folder outside the tree it then runs ``gim-fast explain``
on a tiny model saved to disk, and imports every subpackage.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from jobs_support import save_tiny

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "gim_fast", "kernels")


def _run(cmd, **kwargs):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's python, its bin folder, a folder outside the source tree, the wheel)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "wheels", src])
    (wheel,) = (tmp / "wheels").glob("gim_fast-*.whl")

    env = tmp / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", env])
    env_python = env / "bin" / "python"
    env_site = Path(_run([env_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    main_sites = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))   # torch may be in platlib
    (env_site / "main_environment.pth").write_text("".join(f"{p}\n" for p in main_sites))
    _run([sys.executable, "-m", "pip", "--python", env_python, "install", "--no-deps", "--no-index", "-q", wheel])

    outside = tmp / "elsewhere"
    outside.mkdir()
    return env_python, env / "bin", outside, wheel


def _env():
    """This process's environment without anything that could point back at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "GIM_FAST_LXT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_wheel_holds_every_subpackage_and_no_top_level_kernels(installed):
    *_, wheel = installed
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"gim_fast", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    packages = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
                for p in (ROOT / "gim_fast").rglob("__init__.py")}
    in_wheel = {n[:-len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert in_wheel == packages
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gim_fast").rglob("*.py")}
    modules |= {"gim_fast/" + str(p.relative_to(ROOT)) for p in (ROOT / "kernels").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == modules


def test_installed_package_imports_outside_the_source_tree(installed):
    env_python, _, outside, _ = installed
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import gim_fast, gim_fast.evaluate, gim_fast.jobs, gim_fast.ops, gim_fast.integration
        import gim_fast.kernels.attention, gim_fast.kernels.norm   # kernels/: a folder without __init__.py
        for module in (gim_fast, gim_fast.kernels.attention, gim_fast.kernels.norm):
            assert module.__file__.startswith(sys.prefix), (module.__file__, sys.prefix)
            assert not module.__file__.startswith({str(ROOT)!r}), module.__file__
        spec = importlib.util.find_spec("kernels")      # Hugging Face's package, if installed; never ours
        assert spec is None or not spec.origin.startswith((sys.prefix, {str(ROOT / "kernels")!r})), spec
        from gim_fast.evaluate import attnlrp         # AttnLRP's worker ships, its side install is this env's
        assert attnlrp.WORKER.is_file() and str(attnlrp.WORKER).startswith(sys.prefix), attnlrp.WORKER
        assert attnlrp.side_dir() == __import__("pathlib").Path(sys.prefix) / "lxt", attnlrp.side_dir()
        assert "no AttnLRP side install at " + str(attnlrp.side_dir()) in attnlrp.unavailable()
        print("ok", gim_fast.__file__)
    """)
    done = _run([env_python, "-c", code], cwd=outside, env=_env())
    assert done.stdout.startswith("ok ")


def test_installed_command_explains_a_tiny_model(installed):
    _, bin_dir, outside, _ = installed
    model = save_tiny(outside / "tiny")
    done = _run([bin_dir / "gim-fast", "explain", "hello world", "--model", model, "--color", "never"],
                cwd=outside, env=_env())
    rows = [line for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == len("hello world"), done.stdout     # the char tokenizer: one token per character
    assert "target:" in done.stdout
