"""The benchmarks run end to end at tiny sizes on the CPU, so they cannot rot between GPU runs."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (csv_path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows and all(r["device"] and r["torch"] and r["date"] for r in rows)
    return rows


def test_attention_benchmark_quick(tmp_path):
    rows = _run(["bench/attention.py", "--quick", "--seqlens", "33", "--repeats", "1"], tmp_path)
    assert {r["provider"] for r in rows} == {"gim-torch", "gim-eager", "sdpa"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd-nograd", "bwd", "fwd+bwd"}
    assert all(float(r["vs_sdpa"]) > 0 for r in rows)
    assert all(float(r["p50_ms"]) > 0 for r in rows)


def test_explain_benchmark_tiny(tmp_path):
    rows = _run(["bench/explain.py", "--config", "smollm2-135m-arch", "--layers", "1", "--seqlens", "32",
                 "--repeats", "1", "--providers", "gim-torch", "plain"], tmp_path)
    assert [(r["provider"], r["status"]) for r in rows] == [("gim-torch", "ok"), ("plain", "ok")]
    assert all(int(r["peak_mem_bytes"]) > 0 for r in rows)
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))  # the summary table and the plot


def test_answers_benchmark_tiny(tmp_path):
    rows = _run(["bench/answers.py", "--config", "smollm2-135m-arch", "--layers", "1", "--dtype", "fp32",
                 "--prompt", "24", "--answer", "3"], tmp_path)
    assert [(r["mode"], r["status"]) for r in rows] == [(m, "ok") for m in ("explain-calls", "inseq-loop",
                                                                            "sequential", "matrix", "total",
                                                                            "explain-one")]
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert float(next(r for r in rows if r["mode"] == "matrix")["ratio_to_explain-calls"]) > 0
