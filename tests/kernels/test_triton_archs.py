"""Per-architecture configuration tables: which table a device runs, that every table serves every launch the
kernels can plan, and that the committed compile reports (``bench/compile_report.py --arch ARCH``) screened
exactly the configurations the tables ship now, with no failure. No GPU and no compiling: the reports' JSON
files are the compiler's verdicts; ``tests/kernels/test_triton_compile_report.py`` compiles for real."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from gim_fast.kernels import archs  # noqa: E402
from gim_fast.kernels.archs import ARCHS, CONSERVATIVE, arch_name  # noqa: E402

attention = pytest.importorskip("gim_fast.kernels.attention")
compile_report = pytest.importorskip("compile_report")

# The architectures the issue asks a clean report for (the others are reported too).
SCREENED = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx942")


@pytest.mark.parametrize("backend,target,name", [
    ("cuda", 80, "sm_80"), ("cuda", 86, "sm_86"), ("cuda", 89, "sm_89"), ("cuda", 90, "sm_90a"),
    ("cuda", 100, "sm_100a"), ("cuda", 103, "sm_103a"), ("cuda", 120, "sm_120"), ("cuda", 75, "sm_75"),
    ("hip", "gfx942:sramecc+:xnack-", "gfx942"), ("hip", "gfx950", "gfx950"), ("hip", "gfx90a", "gfx90a")])
def test_arch_names(backend, target, name):
    assert arch_name(backend, target) == name


def test_device_arch_reads_the_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=8, minor=9))
    monkeypatch.setattr(torch.version, "hip", None)
    assert archs.device_arch(0) == "sm_89"
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=9, minor=4, gcnArchName="gfx942:sramecc+:xnack-"))
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert archs.device_arch(0) == "gfx942"


def test_every_architecture_gets_a_table():
    """Each architecture runs its own table or a screened one; one without a table (older or newer) the most
    conservative screened table of its vendor."""
    for arch in ARCHS:
        assert attention.config_table(arch) in attention._CONFIGS
    for arch in SCREENED:
        assert attention.config_table(arch) in SCREENED
    assert attention.config_table("sm_75") == attention.config_table("sm_103a") == CONSERVATIVE["cuda"]
    assert attention.config_table("gfx90a") == attention.config_table("gfx1100") == CONSERVATIVE["hip"]
    assert ARCHS[CONSERVATIVE["cuda"]].shared_bytes == min(a.shared_bytes for a in ARCHS.values()
                                                          if a.backend == "cuda")


@pytest.mark.parametrize("table", sorted({attention.config_table(a) for a in ARCHS}))
def test_every_table_serves_every_launch(table):
    """For every kernel, padded head dim, operand type and feature set the launchers can plan, the table offers
    at least one configuration."""
    for kind in ("fwd", "dkdv", "dq"):
        for block_d in (64, 128, 256):
            for fp32 in (False, True):
                for temp_mode in (0, 1, 2):
                    for softcap in (False, True):
                        for causal in (False, True):
                            meta = dict(TEMP_MODE=temp_mode, HAS_SOFTCAP=softcap, CAUSAL=causal)
                            assert attention._gpu_configs(kind, block_d, fp32, meta, table), \
                                (table, kind, block_d, fp32, meta)


_TASKS = """
import json, sys
sys.path.insert(0, "bench")
import compile_report
out = {}
for arch in compile_report.ARCHS:
    tasks = compile_report.build_tasks(arch, compile_report.PLAN, None, list(compile_report.KINDS), None, None, False)
    out[arch] = sorted({json.dumps([t["kind"], t["head_dim"], t["dtype"], t["feature"],
                                    json.dumps(t["config"], sort_keys=True)]) for t in tasks})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shipped_tasks():
    """{arch: the (kernel, head dim, dtype, feature set, config) compile tasks its table ships}, planned as on a GPU:
    in a child process without TRITON_INTERPRET (the interpreter plans no 16-bit tensor-core launches)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TASKS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {arch: {tuple(json.loads(t)) for t in tasks} for arch, tasks in json.loads(done.stdout).items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_committed_reports_screen_the_shipped_tables(arch, shipped_tasks):
    """The committed report of each architecture compiled exactly the configurations its table ships now, for
    every planned feature set, and none fails (spills, shared memory, warnings, instruction, compile errors)."""
    path = ROOT / "bench" / "results" / f"{compile_report.output_stem(arch)}.json"
    if arch not in SCREENED and not path.exists():
        pytest.skip(f"no report for {arch}")
    report = json.loads(path.read_text())
    assert report["meta"]["target"] == arch and report["meta"]["table"] == attention.config_table(arch)
    shipped = [r for r in report["records"] if r["shipped"]]
    got = {(r["kernel"], r["head_dim"], r["dtype"], r["features"], json.dumps(r["config"], sort_keys=True))
           for r in shipped}
    assert got == shipped_tasks[arch], "the report is stale: run bench/compile_report.py --arch " + arch
    assert compile_report.failures(report["records"], arch) == []


def test_docs_tables_are_generated_from_the_reports():
    import compile_tables

    doc = compile_tables.DOC.read_text()
    assert compile_tables.splice(doc, compile_tables.tables(compile_tables.load_reports())) == doc, \
        "docs/gpus.md is stale: run python bench/compile_tables.py --write"
