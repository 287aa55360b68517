"""The package's layering, read from the source: every module of gim_fast/ (and kernels/, installed as
gim_fast.kernels) belongs to one layer, imports nothing from a layer above its own (also not inside a function),
and no chain of imports leads back to where it started. The layers, bottom to top, are listed in ``LAYERS``;
docs/architecture.md draws the same chain."""
import ast
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("gim_fast.kernels",),                                   # Triton kernels: nothing of gim_fast
    ("gim_fast.settings", "gim_fast.cli_args", "gim_fast.outputs", "gim_fast.data", "gim_fast.display",
     "gim_fast.sources", "gim_fast.textfiles", "gim_fast.progress", "gim_fast.chat",
     "gim_fast.placement"),                                  # plain values, checks and formatting
    ("gim_fast.backends",),                                  # which backend runs
    ("gim_fast.ops",),                                       # GIM's autograd Functions on tensors
    ("gim_fast.integration",),                               # GIM on models; reversible model state
    ("gim_fast.memory", "gim_fast.models", "gim_fast.html", "gim_fast.examples"),
    ("gim_fast.engine",),                                    # one forward, the input-gradient backward
    ("gim_fast.explain", "gim_fast.answers", "gim_fast.context", "gim_fast.context_table",
     "gim_fast.context_ablation", "gim_fast.context_result"),  # the public API
    ("gim_fast.jobs",),                                      # data sets
    ("gim_fast.evaluate",),                                  # faithfulness evaluation
    ("gim_fast.circuits",),                                  # circuit discovery
    ("gim_fast.cli", "gim_fast.__main__", "gim_fast"),       # the command line, the package's front
]


def _modules():
    """(dotted name, path, is a package) of every module of the installed package, kernels/ as gim_fast.kernels."""
    for path in sorted((ROOT / "gim_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        parts = ("gim_fast", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path, path.name == "__init__.py"


MODULES = list(_modules())
NAMES = {m for m, _, _ in MODULES}


def _imports(name: str, path: Path, is_package: bool):
    """Every module ``name`` imports, anywhere in the file, as absolute dotted names (``from p import x`` names
    ``p.x`` when that is a module, else ``p``)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in NAMES)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    """The index of the layer ``module`` belongs to (the longest matching prefix), None outside gim_fast."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix if prefix == "gim_fast" else _within(module, prefix)):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _graph() -> dict[str, set[str]]:
    """module -> the gim_fast modules it imports, and the packages above them that importing runs (except the
    root and the importer's own packages, which are already being imported)."""
    graph = {}
    for name, path, is_package in MODULES:
        targets = set()
        for module in _imports(name, path, is_package):
            while module and module not in NAMES:
                module = module.rpartition(".")[0]
            if not module:
                continue
            parts = module.split(".")
            for i in range(2, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in NAMES and not _within(name, target):
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_is_in_a_layer():
    assert not [m for m in NAMES if _layer(m) is None]
    for prefixes in LAYERS:
        for prefix in prefixes:
            assert any(_within(n, prefix) for n in NAMES), prefix


@pytest.mark.parametrize("name,path,is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_upward_import(name, path, is_package):
    own = _layer(name)
    for module in _imports(name, path, is_package):
        if not _within(module, "gim_fast") or module == "gim_fast":
            continue
        assert _layer(module) <= own, f"{name} (layer {own}) imports {module}, a layer above (layer {_layer(module)})"


@pytest.mark.parametrize("name,path,is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_import_of_the_package_itself(name, path, is_package):
    """``import gim_fast`` (or a name of its ``__init__``) inside the package runs the whole package from the
    middle of one of its modules: a module imports the module it needs."""
    if name == "gim_fast":
        return
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name == "gim_fast"], f"{name}: import gim_fast"
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "gim_fast":
                names = [a.name for a in node.names if f"gim_fast.{a.name}" not in NAMES]
                assert not names, f"{name} imports {names} from the package's __init__"


def test_kernels_import_nothing_of_gim_fast():
    # kernels/ is self-contained: its modules import one another (attention imports archs), nothing else of gim_fast
    for name, path, is_package in MODULES:
        if _within(name, "gim_fast.kernels"):
            outside = [m for m in _imports(name, path, is_package)
                       if _within(m, "gim_fast") and not _within(m, "gim_fast.kernels")]
            assert not outside, name


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
    # the checker itself, on graphs with a known answer
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_the_graph_sees_function_local_imports(tmp_path):
    # a function-local import is an edge like any other: it cannot hide a cycle
    assert "gim_fast.integration.tlens" in _graph()["gim_fast.integration.state"]
    source = "def f():\n    from .b import x\n"
    tree_imports = list(_imports("gim_fast.a", _write(tmp_path / "a.py", source), False))
    assert "gim_fast.b" in tree_imports


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
