"""The files of a circuit run: summary.csv, curve.csv, edges.parquet, faithfulness.png, circuit.html (the circuit
drawn, see ``gim_fast.circuits.html``), run.json (and exact.csv when scores were compared with exact patching)."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

from .html import write_circuit_html
from .run import CircuitResult

__all__ = ["write_results", "summary_rows", "markdown_summary"]

log = logging.getLogger(__name__)


def summary_rows(result: CircuitResult) -> list[dict]:
    """One row per method and level: CPR, CMD, the scoring time and peak memory (MB above the start of the
    scoring: CUDA allocations, or the CPU process's resident set), and the exact-patching correlation."""
    n = len(result.task)
    rows = []
    for curve in result.faithfulness.curves:
        row = dict(task=result.task.name, model=result.model, method=curve.method, level=curve.level,
                   ranking=curve.ranking, cpr=round(curve.cpr, 4), cmd=round(curve.cmd, 4), seconds=round(curve.seconds, 3),
                   seconds_per_example=round(curve.seconds / n, 4), examples=n,
                   peak_mb=_megabytes(result.peak_bytes.get(curve.method)))
        if result.exact is not None:
            row["spearman_exact"] = round(result.exact.correlations.get(curve.method, float("nan")), 4)
        rows.append(row)
    return rows


def _megabytes(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def markdown_summary(result: CircuitResult) -> str:
    p = result.performance
    lines = [f"{result.model}, {result.task.name} ({len(result.task)} examples; {result.graph}): clean accuracy "
             f"{p.accuracy:.0%}, metric {p.clean_metric:.3f} clean vs {p.corrupt_metric:.3f} corrupt",
             "", "| method | level | ranking | CPR ↑ | CMD ↓ | s/example | peak MB |" + (" ρ exact |" if result.exact else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if result.exact else "")]
    for row in summary_rows(result):
        extra = f" {row['spearman_exact']:.3f} |" if result.exact else ""
        lines.append(f"| {row['method']} | {row['level']} | {row['ranking']} | {row['cpr']:.3f} | {row['cmd']:.3f} | "
                     f"{row['seconds_per_example']:.3f} | {row['peak_mb']} |{extra}")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_results(result: CircuitResult, out, *, command: str = "", environment: dict | None = None) -> dict:
    """Write every file into ``out`` (created); returns {name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    files["summary"] = out / "summary.csv"
    _write_csv(files["summary"], summary_rows(result))
    curve_rows = [dict(method=c.method, level=c.level, ranking=c.ranking, percent=p, faithfulness=round(f, 6), edges=e)
                  for c in result.faithfulness.curves for p, f, e in zip(c.percentages, c.faithfulness, c.edges)]
    files["curve"] = out / "curve.csv"
    _write_csv(files["curve"], curve_rows)

    graph = result.graph
    index = graph.edge_index()
    columns = {"edge": graph.edge_names(), "src": [graph.sources[i] for i in index[:, 0].tolist()],
               "dst": [graph.inputs[i] for i in index[:, 1].tolist()]}
    for name, s in result.scores.items():
        columns[f"score_{name}"] = s.edge_values().float().numpy()
    files["edges"] = out / "edges.parquet"
    pq.write_table(pa.table(columns), files["edges"])

    if result.exact is not None:
        e = result.exact
        rows = [dict(edge=f"{graph.sources[s]}->{graph.inputs[i]}", exact=float(x),
                     **{f"score_{k}": float(v.edges[s, i]) for k, v in result.scores.items()})
                for (s, i), x in zip(e.edges.tolist(), e.effects)]
        files["exact"] = out / "exact.csv"
        _write_csv(files["exact"], rows)

    files["html"] = write_circuit_html(result, out / "circuit.html")
    plot = _plot(result, out / "faithfulness.png")
    if plot is not None:
        files["plot"] = plot
    files["run"] = out / "run.json"
    run = dict(command=command, environment=environment or {}, model=result.model, task=result.task.name,
               examples=len(result.task), metric=result.task.metric.describe(), graph=str(graph),
               performance=asdict(result.performance), full_metric=result.faithfulness.full_metric,
               empty_metric=result.faithfulness.empty_metric, seconds=result.seconds, notes=result.task.notes,
               exact=(None if result.exact is None else dict(edges=len(result.exact.edges),
                                                              correlations=result.exact.correlations,
                                                              seconds=result.exact.seconds)),
               example_texts=result.task.texts[:5])
    files["run"].write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return files


def _plot(result: CircuitResult, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        log.warning("matplotlib is not installed: no faithfulness.png (pip install matplotlib)")
        return None
    panels = list(dict.fromkeys((c.level, c.ranking) for c in result.faithfulness.curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (level, ranking) in zip(axes[0], panels):
        for c in result.faithfulness.curves:
            if (c.level, c.ranking) == (level, ranking):
                ax.plot(c.percentages, c.faithfulness, marker="o", ms=3,
                        label=f"{c.method} (CPR {c.cpr:.2f}, CMD {c.cmd:.2f})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{level}s kept (%)")
        ax.set_ylabel("faithfulness f(k)")
        ax.set_title(f"{result.model}, {result.task.name}: {level}s, {ranking} ranking", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
