"""Result files of the faithfulness evaluation: CSVs, the markdown table, the temperature-sweep plot, run.json."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from ..display import plural
from .run import ModelResult, mean_abs, example_rows, mean_se, summary_rows, write_json

__all__ = ["write_results", "markdown_table", "plot_temperature_sweep"]

# the order rows appear in the table; anything else follows in run order
_ORDER = ("gim", "grad_x_input", "freeze_norm_only", "temperature_only", "qkv_scaling_only", "mlp_scaling_only",
          "integrated_gradients", "attnlrp", "random")


def run_facts(environment: dict, seed: int, wall_seconds: float) -> str:
    """A report header's facts about its run: device, versions, date, seed and wall time."""
    return (f"{environment.get('device')}, torch {environment.get('torch')}, transformers "
            f"{environment.get('transformers')}, {environment.get('date')}; seed {seed}; wall time "
            f"{wall_seconds / 60:.1f} min")


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _sweep_names(result: ModelResult) -> list[tuple[float, str]]:
    out = []
    for name in result.methods:
        if name.startswith("gim_t"):
            out.append((float(name[len("gim_t"):]), name))
    return sorted(out)


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {se:.3f}"


def _values(m, metric: str, measure: str) -> list[float]:
    return getattr(m, metric if measure == "logit" else f"{metric}_prob")


def markdown_table(results: list[ModelResult], notes: dict[str, str] | None = None, measure: str = "logit") -> str:
    """method × model: comprehensiveness ↑, sufficiency ↓ (mean ± standard error), seconds per example, N.
    The best mean of each column (among methods that ran) is in bold. ``measure``: "logit" (the paper's) or
    "prob" (the same with the target's probability)."""
    notes = notes or {}
    names = [n for n in _ORDER if any(n in r.methods for r in results) or n in notes]
    for r in results:
        names += [n for n in r.methods if n not in names and not n.startswith("gim_t")]
    header = "| method |" + "".join(f" {r.model}: comp. ↑ | suff. ↓ | s/example | N |" for r in results)
    rule = "|---|" + "---:|---:|---:|---:|" * len(results)
    best = {}
    for r in results:
        ran = {n: m for n, m in r.methods.items() if m.n and not n.startswith("gim_t")}
        if ran:
            best[r.model] = (max(ran, key=lambda n: mean_se(_values(ran[n], "comprehensiveness", measure))[0]),
                             min(ran, key=lambda n: mean_se(_values(ran[n], "sufficiency", measure))[0]))
    lines = [header, rule]
    for name in names:
        cells = [f"`{name}`"]
        for r in results:
            m = r.methods.get(name)
            if m is None or not m.n:
                reason = (m.unavailable if m is not None else None) or notes.get(name)
                cells += ["not run" if reason is None else "unavailable¹", "", "", "0"]
                continue
            comp = _fmt(*mean_se(_values(m, "comprehensiveness", measure)))
            suff = _fmt(*mean_se(_values(m, "sufficiency", measure)))
            b_comp, b_suff = best.get(r.model, (None, None))
            comp = f"**{comp}**" if name == b_comp else comp
            suff = f"**{suff}**" if name == b_suff else suff
            cells += [comp, suff, f"{m.seconds / m.n:.3f}", str(m.n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: list[ModelResult], reference: str = "gim") -> str:
    """GIM minus every other method, example by example (mean ± standard error of the paired differences): the
    uncertainty of a comparison, smaller than the two columns' own errors suggest. Raw-logit metrics.
    Δ comprehensiveness > 0 and Δ sufficiency < 0 favour GIM."""
    lines = ["| method |" + "".join(f" {r.model}: Δ comp. | Δ suff. |" for r in results),
             "|---|" + "---:|---:|" * len(results)]
    names = [n for r in results for n in r.methods if n != reference and not n.startswith("gim_t")]
    for name in dict.fromkeys(names):
        cells = [f"`{reference}` − `{name}`"]
        for r in results:
            a, b = r.methods.get(reference), r.methods.get(name)
            if a is None or b is None or not a.n or not b.n:
                cells += ["–", "–"]
                continue
            for metric in ("comprehensiveness", "sufficiency"):
                diffs = [x - y for x, y in zip(getattr(a, metric), getattr(b, metric))]
                cells.append(_fmt(*mean_se(diffs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: list[ModelResult], measure: str = "logit") -> str:
    temps = sorted({t for r in results for t, _ in _sweep_names(r)})
    if not temps:
        return ""
    lines = ["| model | metric |" + "".join(f" T = {t:g} |" for t in temps), "|---|---|" + "---:|" * len(temps)]
    for r in results:
        by_t = dict(_sweep_names(r))
        for metric, label in (("comprehensiveness", "comp. ↑"), ("sufficiency", "suff. ↓")):
            cells = []
            for t in temps:
                m = r.methods.get(by_t.get(t, ""))
                cells.append(f"{mean_se(_values(m, metric, measure))[0]:.3f}" if m is not None and m.n else "–")
            lines.append(f"| {r.model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_temperature_sweep(results: list[ModelResult], path: Path) -> Path | None:
    """Comprehensiveness and sufficiency of GIM against the softmax temperature, one line per model (the standard
    error as a band), gradient × input as a dashed reference; top row the paper's raw-logit metrics, bottom row
    the probability variant. None (and no file) if there is no sweep or matplotlib is missing."""
    if not any(r.methods[n].n for r in results for _, n in _sweep_names(r)):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks = sorted({t for r in results for t, _ in _sweep_names(r)})
    for row, measure in enumerate(("logit", "prob")):
        for k, r in enumerate(results):
            sweep = [(t, r.methods[n]) for t, n in _sweep_names(r) if r.methods[n].n]
            if not sweep:
                continue
            color = colors[k % len(colors)]
            for ax, metric in zip(axes[row], ("comprehensiveness", "sufficiency")):
                ts = [t for t, _ in sweep]
                stats = [mean_se(_values(m, metric, measure)) for _, m in sweep]
                means = [s[0] for s in stats]
                ax.plot(ts, means, "o-", color=color, label=f"{r.model}: GIM (N = {sweep[0][1].n})")
                ax.fill_between(ts, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.15)
                ref = r.methods.get("grad_x_input")
                if ref is not None and ref.n:
                    ax.axhline(mean_se(_values(ref, metric, measure))[0], color=color, ls="--", lw=1,
                               label=f"{r.model}: gradient × input")
        what = "raw target logit (paper)" if measure == "logit" else "target probability"
        for ax, title in zip(axes[row], ("comprehensiveness ↑", "sufficiency ↓")):
            ax.set_title(f"{title}, {what}", fontsize=10)
            ax.set_xscale("log")
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("GIM softmax temperature T (other settings at their defaults)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("GIM temperature sweep: mean over examples ± standard error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: list[ModelResult], out: Path, *, command: str, environment: dict,
                  notes: dict[str, str], data: str, seed: int, wall_seconds: float) -> dict[str, Path]:
    """Write summary.csv, examples.csv, temperature_sweep.csv, faithfulness.md, temperature_sweep.png, run.json."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    summary = summary_rows(results)
    for r in results:   # methods that could not run here: a row each, with the reason
        summary += [{"model": r.model, "method": name, "n": 0, "unavailable": reason}
                    for name, reason in notes.items() if name not in r.methods]
    _write_csv(out / "summary.csv", summary)
    files["summary"] = out / "summary.csv"
    _write_csv(out / "examples.csv", example_rows(results))
    files["examples"] = out / "examples.csv"
    sweep_rows = [row for row in summary if row["method"].startswith("gim_t")]
    if sweep_rows:
        _write_csv(out / "temperature_sweep.csv", sweep_rows)
        files["sweep_csv"] = out / "temperature_sweep.csv"
    plot = plot_temperature_sweep(results, out / "temperature_sweep.png")
    if plot is not None:
        files["plot"] = plot

    md = ["# Faithfulness: comprehensiveness and sufficiency (GIM paper definitions)", "",
          f"Command: `{command}`", "",
          f"Data: {data}; environment: {run_facts(environment, seed, wall_seconds)}.", ""]
    for r in results:
        sel = r.selection
        md.append(f"- {r.model}: {plural(len(sel.examples), 'example')}: the first {len(sel.examples)} of "
                  f"{sel.candidates} shuffled candidates that the model answers right ({sel.correct} right; "
                  f"{sel.total} in the data set); baseline token {r.baseline_token!r}; time {r.seconds['total']:.0f} s "
                  f"(attributions {r.seconds['attribute']:.0f} s, metrics {r.seconds['metrics']:.0f} s).")
    md += ["", "Mean ± standard error over examples; comprehensiveness: higher is better, sufficiency: lower is "
           "better; best of each column in bold; s/example: attribution time only (the metrics excluded).", "",
           "## The paper's metrics (raw target logit)", "", markdown_table(results, notes), "",
           "GIM against each method on the same examples (paired differences, raw logit; Δ comp. > 0 and "
           "Δ suff. < 0 favour GIM):", "", paired_table(results), "",
           "## The same perturbations scored with the target's probability (not the paper's definition)", "",
           markdown_table(results, notes, measure="prob"), ""]
    for r in results:
        ig = r.methods.get("integrated_gradients")
        if ig is not None and ig.n and ig.extra.get("ig_completeness_gap"):
            gaps, diffs = ig.extra["ig_completeness_gap"], ig.extra["ig_logit_difference"]
            md.append(f"- {r.model}: Integrated Gradients' completeness gap |Σ scores − (f(x) − f(baseline))| "
                      f"averages {mean_abs(gaps):.2f} against |f(x) − f(baseline)| of "
                      f"{mean_abs(diffs):.2f} (50 steps): it is not a ground truth.")
        lrp = r.methods.get("attnlrp")
        if lrp is not None and lrp.n and lrp.extra.get("attnlrp_conservation_gap"):
            gaps, logits = lrp.extra["attnlrp_conservation_gap"], lrp.extra["attnlrp_logit"]
            side = lrp.checks.get("attnlrp_side", {})
            md.append(f"- {r.model}: AttnLRP (lxt {side.get('lxt', '?')}, transformers {side.get('transformers', '?')} "
                      f"in the side process): the side model's logits equal this environment's to "
                      f"{lrp.checks.get('attnlrp_logit_max_rel_diff', float('nan')):.1e} (max |Δ| / max |logit|, all "
                      f"{lrp.checks.get('attnlrp_prompts_checked', 0)} prompts); its conservation gap |Σ R − f(x)| "
                      f"averages {mean_abs(gaps):.2f} against |f(x)| of {mean_abs(logits):.2f} (relevance "
                      "conserved at every rule but the softmax's, which absorbs the rest).")
    for name, reason in notes.items():
        md.append(f"- ¹ `{name}`: {reason}")
    for r in results:   # methods that could not run on one model (e.g. AttnLRP refused by its logit check)
        md += [f"- ¹ {r.model}, `{name}`: {m.unavailable}" for name, m in r.methods.items() if m.unavailable]
    sweep = sweep_table(results)
    if sweep:
        md += ["", "## Temperature sweep (GIM, other settings at their defaults)", "", "Raw target logit (paper):", "",
               sweep, "", "Target probability:", "", sweep_table(results, "prob"), "",
               "![temperature sweep](temperature_sweep.png)" if plot is not None else ""]
    (out / "faithfulness.md").write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    files["markdown"] = out / "faithfulness.md"

    write_json(out / "run.json", {
        "command": command, "environment": environment, "data": data, "seed": seed,
        "wall_seconds": round(wall_seconds, 1), "notes": notes,
        "models": [{"model": r.model, "seconds": {k: round(v, 2) for k, v in r.seconds.items()},
                    "examples": [ex.key for ex in r.selection.examples], "candidates": r.selection.candidates,
                    "correct": r.selection.correct, "total": r.selection.total, "baseline_token": r.baseline_token,
                    "checks": {name: m.checks for name, m in r.methods.items() if m.checks}}
                   for r in results],
    })
    files["run"] = out / "run.json"
    return files
