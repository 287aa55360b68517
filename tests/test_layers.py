"""The package's layering: data flows explain → engine → integration → ops → kernels, and no module imports a
layer above its own (also not inside a function). The command lines share their argument helpers from
``gim_fast.cli_args``, which imports nothing of gim_fast."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the layers above each one: a module of the key may import none of them
UPWARD = {
    "gim_fast.kernels": ("gim_fast",),
    "gim_fast.ops": ("gim_fast.integration", "gim_fast.engine", "gim_fast.explain", "gim_fast.answers",
                     "gim_fast.jobs", "gim_fast.evaluate", "gim_fast.cli"),
    "gim_fast.integration": ("gim_fast.engine", "gim_fast.explain", "gim_fast.answers", "gim_fast.jobs",
                             "gim_fast.evaluate", "gim_fast.cli"),
    "gim_fast.engine": ("gim_fast.explain", "gim_fast.answers", "gim_fast.jobs", "gim_fast.evaluate",
                        "gim_fast.cli"),
    "gim_fast.jobs": ("gim_fast.evaluate", "gim_fast.cli"),
    "gim_fast.evaluate": ("gim_fast.cli",),   # gim_fast.cli_args is not gim_fast.cli (compared by dotted parts)
    "gim_fast.cli_args": ("gim_fast",),
}


def _modules():
    """(dotted name, path) of every module of the installed package, kernels/ as gim_fast.kernels."""
    for path in sorted((ROOT / "gim_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        parts = ("gim_fast", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_package: bool):
    """Every module ``name`` imports, anywhere in the file, as absolute dotted names."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)   # `from . import tlens` names a module


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = list(_modules())


def test_every_layer_is_found():
    names = {m for m, _, _ in MODULES}
    for layer in UPWARD:
        assert any(_within(n, layer) for n in names), layer


@pytest.mark.parametrize("name,path,is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_upward_import(name, path, is_package):
    for layer, above in UPWARD.items():
        if not _within(name, layer):
            continue
        for module in _imports(name, path, is_package):
            if _within(module, layer):
                continue
            bad = [a for a in above if _within(module, a)]
            assert not bad, f"{name} imports {module}, a layer above {layer}"
