"""Result files of the context evaluation: summary.csv, examples.csv, context.md (the tables), run.json."""
from __future__ import annotations

import math
from pathlib import Path

from .ablation import LDS_ABLATIONS, TOP_K
from .context_methods import CONTEXT_METHODS
from .context_run import ContextModelResult, ContextRow, ContextSelection
from ..display import plural
from .report import _write_csv, run_facts
from .run import mean_se, write_json

__all__ = ["write_context_results", "read_context_results", "markdown_context_table", "summary_rows"]

_METRICS = [*(f"drop{k}" for k in TOP_K), "lds", "lds_top_kept", "lds_top_removed", "gold_rank", "gold_first"]


def _values(rows, method: str, metric: str) -> list[float]:
    out = []
    for r in rows:
        m = r.methods.get(method)
        if m is None:
            continue
        if metric.startswith("drop"):
            out.append(m["drop"][int(metric[4:])])
        elif metric == "gold_first":
            out.append(1.0 if m["gold_rank"] == 1 else 0.0)
        elif metric == "forward_equivalents":
            out.append(m["forwards"] + m["backwards"])
        elif not math.isnan(m.get(metric, math.nan)):
            out.append(m[metric])
    return out


def _groups(result: ContextModelResult):
    """(group: the written task or capitals-<documents>, its rows, methods in run order)."""
    for group in dict.fromkeys(r.group for r in result.rows):
        rows = [r for r in result.rows if r.group == group]
        methods = list(dict.fromkeys(name for r in rows for name in r.methods))
        yield group, rows, methods


def summary_rows(results: list[ContextModelResult]) -> list[dict]:
    """One row per (model, documents, method): each metric's mean and standard error, the cost, N."""
    out = []
    for result in results:
        for group, rows, methods in _groups(result):
            for name in methods:
                row = {"model": result.model, "set": group, "documents": mean_se([r.documents for r in rows])[0],
                       "method": name,
                       "description": CONTEXT_METHODS[name][0], "n": len(_values(rows, name, "lds"))}
                for metric in _METRICS:
                    row[metric], row[f"{metric}_se"] = mean_se(_values(rows, name, metric))
                for cost in ("seconds", "forwards", "backwards"):
                    row[f"{cost}_per_answer"] = mean_se([r.methods[name][cost] for r in rows])[0]
                row["forward_equivalents"] = row["forwards_per_answer"] + row["backwards_per_answer"]
                row["prompt_tokens"] = mean_se([r.prompt_tokens for r in rows])[0]
                row["answer_tokens"] = mean_se([r.answer_tokens for r in rows])[0]
                out.append(row)
    return out


def example_rows(results: list[ContextModelResult]) -> list[dict]:
    out = []
    for result in results:
        for r in result.rows:
            for name, m in r.methods.items():
                out.append({"model": result.model, "set": r.group, "task": r.task, "documents": r.documents,
                            "key": r.key, "method": name,
                            "answer": r.answer, "answer_tokens": r.answer_tokens, "prompt_tokens": r.prompt_tokens,
                            "full_logprob": r.full_logprob, "gold": r.gold, "gold_rank": m["gold_rank"],
                            **{f"drop{k}": v for k, v in m["drop"].items()}, "lds": m["lds"],
                            "lds_top_kept": m.get("lds_top_kept", math.nan),
                            "lds_top_removed": m.get("lds_top_removed", math.nan),
                            "seconds": m["seconds"], "forwards": m["forwards"], "backwards": m["backwards"],
                            "scores": " ".join(f"{s:.6g}" for s in m["scores"])})
    return out


def _fmt(mean: float, se: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _cost(row) -> str:
    f, b = row["forwards_per_answer"], row["backwards_per_answer"]
    parts = ([f"{f:.0f} F"] if f else []) + ([f"{b:.0f} B"] if b else [])
    return " + ".join(parts) or "0"


def markdown_context_table(results: list[ContextModelResult]) -> str:
    """model × set × method: top-k drops, LDS (all masks; those keeping / removing the method's top-scored source),
    the gold document's rank, cost. The best mean of each column per (model, set) in bold (every method that ties
    it)."""
    summary = summary_rows(results)
    higher = {**{f"drop{k}": True for k in TOP_K}, "lds": True, "lds_top_kept": True, "lds_top_removed": True,
              "gold_rank": False, "gold_first": True}
    header = ("| model | set | docs | method | " + " | ".join(f"top-{k} drop ↑" for k in TOP_K)
              + " | LDS ↑ | LDS, top kept ↑ | LDS, top removed ↑ | gold rank ↓ | gold first ↑ | s/answer | passes "
              "| F-eq. | N |")
    lines = [header, "|---|---|---:|---|" + "---:|" * (len(TOP_K) + 9)]
    for result in results:
        for group, _rows, _methods in _groups(result):
            rows = [r for r in summary if r["model"] == result.model and r["set"] == group]
            best = {}
            for metric, up in higher.items():
                means = [r[metric] for r in rows if not math.isnan(r[metric])]
                if means:
                    best[metric] = (max if up else min)(means)
            for r in rows:
                cells = []
                for metric in higher:
                    text = (_fmt(r[metric], r[f"{metric}_se"], 2) if metric != "gold_first"
                            else f"{r[metric]:.2f}")
                    tied = metric in best and abs(r[metric] - best[metric]) <= 1e-9 * max(1.0, abs(best[metric]))
                    cells.append(f"**{text}**" if tied else text)
                lines.append(f"| {result.model} | {group} | {r['documents']:.0f} | `{r['method']}` | "
                             + " | ".join(cells) + f" | {r['seconds_per_answer']:.2f} | {_cost(r)} | "
                             f"{r['forward_equivalents']:.0f} | {r['n']} |")
    return "\n".join(lines)


def paired_table(results: list[ContextModelResult], reference: str = "gim") -> str:
    """``reference`` minus each method on the same examples (mean ± standard error of the differences)."""
    lines = ["| model | set | " + f"`{reference}` − | " + " | ".join(f"Δ top-{k} drop" for k in TOP_K)
             + " | Δ LDS |", "|---|---|---|" + "---:|" * (len(TOP_K) + 1)]
    for result in results:
        for group, rows, methods in _groups(result):
            if reference not in methods:
                continue
            for name in methods:
                if name == reference:
                    continue
                cells = []
                for metric in [*(f"drop{k}" for k in TOP_K), "lds"]:
                    diffs = [a - b for a, b in zip(_values(rows, reference, metric), _values(rows, name, metric))]
                    cells.append(_fmt(*mean_se(diffs)))
                lines.append(f"| {result.model} | {group} | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_context_results(results: list[ContextModelResult], out: Path, *, command: str, environment: dict,
                          seed: int, wall_seconds: float) -> dict[str, Path]:
    """Write summary.csv, examples.csv, context.md and run.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": out / "summary.csv", "examples": out / "examples.csv", "markdown": out / "context.md",
             "run": out / "run.json"}
    _write_csv(files["summary"], summary_rows(results))
    _write_csv(files["examples"], example_rows(results))
    md = ["# Context attribution against ablation (ContextCite's metrics)", "",
          f"Command: `{command}`", "",
          f"Environment: {run_facts(environment, seed, wall_seconds)}. Timings are indicative when the machine "
          "was shared.", ""]
    for result in results:
        prompt = "the tokenizer's chat template" if result.chat else "a plain prompt (no chat template)"
        capitals = [s for s in result.selections if any(r.task == "capitals" for r in result.rows)]
        sets = [f"{group}: {plural(len(rows), 'example')}" for group, rows, _ in _groups(result)]
        md.append(f"- {result.model} ({prompt}): " + "; ".join(sets) + "".join(
            f"; capitals with {s.documents} documents: {s.correct} of {plural(s.asked, 'question')} answered right"
            for s in capitals) + f"; time {result.seconds['total']:.0f} s.")
    md += ["", f"Top-k drop: log p(answer | all documents) − log p(answer | all but the k highest-scored); LDS: "
           f"Spearman correlation over {LDS_ABLATIONS} random ablations (each document kept with probability ½, the "
           "same masks for every method) between Σ_kept score and log p(answer | kept), also over the masks that keep and "
           "those that remove the method's top-scored document; gold rank: the rank of the "
           "document that states the answer (1 = top); gold first: how often it is ranked first. Mean ± standard "
           "error over examples; best of each column per model and size in bold. s/answer: the method's own time "
           "per answer; passes: forward (F) and backward (B) passes through the model per answer; F-eq.: forward-"
           "equivalents (a backward counts as one forward).", "",
           markdown_context_table(results), ""]
    for reference in ("gim", "gim_ablations"):
        if any(reference in r.methods for result in results for r in result.rows):
            md += [f"`{reference}` against each method on the same examples (paired differences; > 0 favours "
                   f"`{reference}`):", "", paired_table(results, reference), ""]
    md += ["The ContextCite package is `context-cite==0.0.4` (`contextcite`: 64 ablations, `contextcite_16`: 16)."]
    skipped = {f"{name}: {why}" for result in results for r in result.rows for name, why in r.unavailable.items()}
    if skipped:
        md += ["", "Not run: " + "; ".join(sorted(skipped)) + "."]
    files["markdown"].write_text("\n".join(md), encoding="utf-8")
    write_json(files["run"], {
        "command": command, "environment": environment, "seed": seed, "wall_seconds": round(wall_seconds, 1),
        "models": [{"model": r.model, "chat_template": r.chat,
                    "seconds": {k: round(v, 1) for k, v in r.seconds.items()},
                    "selections": [vars(s) for s in r.selections],
                    "examples": [{"documents": row.documents, "key": row.key, "answer": row.answer}
                                 for row in r.rows]} for r in results]})
    return files


def read_context_results(out: Path) -> list[ContextModelResult]:
    """The results a run wrote into ``out`` (examples.csv and run.json), to write the files again (e.g. after a
    change of the report's layout) without computing anything: ``write_context_results(read_context_results(out),
    out, ...)``. Numbers come back as the CSV holds them (6 significant digits)."""
    import csv
    import json

    run = json.loads((Path(out) / "run.json").read_text(encoding="utf-8"))
    rows: dict[tuple, ContextRow] = {}
    with (Path(out) / "examples.csv").open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            key = (r["model"], int(r["documents"]), r["key"])
            row = rows.setdefault(key, ContextRow(r["key"], int(r["documents"]), int(r["gold"]), r["answer"],
                                                  int(r["answer_tokens"]), int(r["prompt_tokens"]),
                                                  float(r["full_logprob"]), task=r.get("task") or "capitals"))
            row.methods[r["method"]] = {
                "scores": [float(v) for v in r["scores"].split()], "seconds": float(r["seconds"]),
                "forwards": int(r["forwards"]), "backwards": int(r["backwards"]),
                "drop": {k: float(r[f"drop{k}"]) for k in TOP_K}, "lds": float(r["lds"]),
                "lds_top_kept": float(r.get("lds_top_kept") or "nan"),
                "lds_top_removed": float(r.get("lds_top_removed") or "nan"),
                "gold_rank": float(r["gold_rank"])}
    return [ContextModelResult(m["model"], m["chat_template"], [ContextSelection(**s) for s in m["selections"]],
                               [row for (model, _, _), row in rows.items() if model == m["model"]], m["seconds"])
            for m in run["models"]]
