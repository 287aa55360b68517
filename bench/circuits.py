"""The circuit tables of the docs (docs/circuits.md): ``gim-fast circuit`` on every task and model, exact patching,
tiny models, the 8B memory estimate, all written to ``bench/results/circuits/`` (one folder per run and
``tables.md``).

    python bench/circuits.py                 # run what is missing, write and print bench/results/circuits/tables.md
    python bench/circuits.py --table-only    # tables.md from the runs already there
    python bench/circuits.py --n 32 --redo   # 32 prompts per task, every run again (about 4x longer)
    python bench/circuits.py --estimate      # only print the Llama-3.1-8B memory estimate (seconds)

Each run is ``gim-fast circuit --task T --model M --n N --threads T --quiet --out bench/results/circuits/T-M`` (N = 8
by default, one CPU thread): CPR and CMD of the edge and node circuits ranked by score (the MIB circuit track's CPR
ranking; ``--ranking both`` in ``gim-fast circuit`` adds the |score| ranking MIB uses for CMD), the scoring time
per example and the scoring's peak memory, per method (gim, eap, eap-ig, random). A task a model does not do is
recorded as refused (``T-M/refused.txt``) and left out of the tables. The exact run patches 150 random edges of
SmolLM2-135M one at a time on the IOI prompts and correlates each method's scores with these effects
(``exact-ioi-smollm2-135m``); the tiny run does the same for every edge of a tiny random model of each supported
family (float64); ``ioi-n32-smollm2-135m`` is IOI at 32 prompts with both rankings (MIB's CPR with the signed
ranking, CMD with the |score| one); the estimate is ``estimate_circuit_memory`` for the Llama-3.1-8B config (no model built).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "circuits"
MODELS = ("smollm2-135m", "gemma3-270m")
TASKS = ("ioi", "greater-than", "capitals")
METHODS = ("gim", "eap", "eap-ig", "random")
EXACT = ["--task", "ioi", "--model", "smollm2-135m", "--levels", "edge", "--percentages", "100",
         "--exact-edges", "150"]
SHORT = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
# 32 prompts on the CPU, with MIB's two rankings (CPR signed, CMD |score|)
SCALE = ("ioi-n32-smollm2-135m", ["--task", "ioi", "--model", "smollm2-135m", "--n", "32", "--ranking", "both"])


def run(name: str, args: list[str], threads: int, redo: bool) -> None:
    out = OUT / name
    if redo and out.exists():
        shutil.rmtree(out)
    if (out / "summary.csv").exists() or (out / "refused.txt").exists():
        return
    command = [str(Path(sys.executable).parent / "gim-fast"), "circuit", *args, "--out", str(out.relative_to(ROOT)),
               "--threads", str(threads), "--quiet"]
    print(" ".join(command), flush=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 2 and "does not perform" in proc.stderr:   # the task check refused it: a result too
        out.mkdir(parents=True, exist_ok=True)
        (out / "refused.txt").write_text(proc.stderr.strip() + "\n", encoding="utf-8")
        print(proc.stderr.strip(), flush=True)
        return
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")


def _run_json(name: str) -> dict | None:
    path = OUT / name / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def performance_table() -> str:
    """Each model's clean accuracy and metric per task (or its refusal)."""
    lines = ["| task | model | examples | clean accuracy | m clean | m corrupt | graph |", "|---|---|---:|---:|---:|---:|---|"]
    for task in TASKS:
        for model in MODELS:
            run = _run_json(f"{task}-{model}")
            refused = OUT / f"{task}-{model}" / "refused.txt"
            if run is not None:
                p = run["performance"]
                lines.append(f"| {task} | {SHORT[model]} | {run['examples']} | {p['accuracy']:.0%} (chance "
                             f"{p['chance']:.0%}) | {p['clean_metric']:.2f} | {p['corrupt_metric']:.2f} | "
                             f"{run['graph'].split(';')[-1].strip()} |")
            elif refused.exists():
                lines.append(f"| {task} | {SHORT[model]} | | refused: {refused.read_text().strip()[:160]} | | | |")
    return "\n".join(lines)


def exact_table() -> str:
    run = _run_json("exact-ioi-smollm2-135m")
    if run is None:
        return "(no exact run yet)"
    exact = run["exact"]
    lines = [f"{exact['edges']} random edges of SmolLM2-135M, {run['examples']} IOI prompts, {exact['seconds']:.0f} s",
             "", "| method | Spearman ρ with exact patching |", "|---|---:|"]
    lines += [f"| `{m}` | {rho:.3f} |" for m, rho in exact["correlations"].items()]
    return "\n".join(lines)


def tiny() -> str:
    """Every edge of a tiny random model of each family (float64), 3 random prompts of 7 tokens."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_circuits import toy_task
    from tiny_models import FAMILIES, tiny_model

    from gim_fast.circuits import Graph, attribute, edge_effects, spearman

    lines = ["| family | edges | " + " | ".join(f"`{m}`" for m in METHODS[:3]) + " |", "|---|---:|---:|---:|---:|"]
    for family in FAMILIES:
        model = tiny_model(family, dtype=torch.float64).eval()
        task, graph = toy_task(), Graph.from_model(model)
        edges = graph.edge_index()
        effects = edge_effects(model, task, edges, graph=graph)
        rho = [spearman(attribute(model, task, m).edges[edges[:, 0], edges[:, 1]], effects) for m in METHODS[:3]]
        lines.append(f"| {family} | {len(edges)} | " + " | ".join(f"{r:.3f}" for r in rho) + " |")
    return "\n".join(lines)


def table(level: str) -> str:
    """One row per task, model and method: CPR, CMD (best in bold), scoring seconds per example, peak MB."""
    lines = ["| task | model | method | CPR ↑ | CMD ↓ | scoring s/example | scoring peak MB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for task in TASKS:
        for model in MODELS:
            path = OUT / f"{task}-{model}" / "summary.csv"
            if not path.exists():
                continue
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if r["level"] == level and r["ranking"] == "signed"]
            best_cpr = max(float(r["cpr"]) for r in rows)
            best_cmd = min(float(r["cmd"]) for r in rows)
            for r in rows:
                cpr, cmd = f"{float(r['cpr']):.2f}", f"{float(r['cmd']):.2f}"
                cpr = f"**{cpr}**" if float(r["cpr"]) == best_cpr else cpr
                cmd = f"**{cmd}**" if float(r["cmd"]) == best_cmd else cmd
                peak = r.get("peak_mb") or "–"
                lines.append(f"| {task} | {SHORT[model]} | `{r['method']}` | {cpr} | {cmd} | "
                             f"{float(r['seconds_per_example']):.2f} | {peak} |")
    return "\n".join(lines)


def scale_table() -> str:
    """The 32-prompt IOI run on SmolLM2: both rankings, the whole run's time."""
    name = SCALE[0]
    run = _run_json(name)
    if run is None:
        return "(no 32-prompt run yet)"
    with open(OUT / name / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [f"SmolLM2-135M, IOI, {run['examples']} prompts, `{run['command']}`: {run['seconds']['total']:.0f} s in "
             f"all ({run['seconds']['faithfulness']:.0f} s of circuit runs)", "",
             "| method | level | CPR ↑ (signed ranking) | CMD ↓ (\\|score\\| ranking) | scoring s/example | peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    by = {(r["method"], r["level"], r["ranking"]): r for r in rows}
    for method in METHODS:
        for level in ("edge", "node"):
            signed, absolute = by.get((method, level, "signed")), by.get((method, level, "absolute"))
            if signed is None or absolute is None:
                continue
            lines.append(f"| `{method}` | {level} | {float(signed['cpr']):.2f} | {float(absolute['cmd']):.2f} | "
                         f"{float(signed['seconds_per_example']):.2f} | {signed.get('peak_mb') or '–'} |")
    return "\n".join(lines)


def estimate() -> str:
    """Llama-3.1-8B (bench/configs.py), bf16: 64 prompts × 32 tokens, and 16 prompts × 512 tokens with every
    layer's Δ expanded and with none."""
    import torch
    from transformers import AutoConfig

    from bench.configs import CONFIGS
    from gim_fast.circuits import Graph, estimate_circuit_memory

    model_type, kwargs = CONFIGS["llama-3.1-8b"]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    weights = 8.03e9 * 2
    lines = [f"Llama-3.1-8B: {Graph.from_config(cfg)}; weights {weights / 1e9:.1f} GB in bf16"]
    for prompts, tokens, layers in ((64, 32, None), (16, 512, None), (16, 512, 0)):
        est = estimate_circuit_memory(cfg, tokens, prompts, dtype=torch.bfloat16, expanded_layers=layers)
        total = (est.total + weights) / 1e9
        lines += ["", f"{prompts} prompts × {tokens} tokens, bf16, Δ of {'every' if layers is None else 'no'} "
                  f"layer expanded: {total:.1f} GB with the weights ({'fits' if total < 80 else 'does not fit'} "
                  "80 GB)", str(est)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-only", action="store_true", help="only write tables.md from the runs there")
    parser.add_argument("--redo", action="store_true", help="delete and redo every run (default: only missing ones)")
    parser.add_argument("--n", type=int, default=8, help="examples per task and model (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    parser.add_argument("--estimate", action="store_true", help="only print the Llama-3.1-8B memory estimate")
    parser.add_argument("--tiny", action="store_true", help="only print the tiny models' exact-patching table")
    args = parser.parse_args()
    if args.estimate or args.tiny:
        print(estimate() if args.estimate else tiny())
        return 0
    if not args.table_only:
        for task in TASKS:
            for model in MODELS:
                run(f"{task}-{model}", ["--task", task, "--model", model, "--n", str(args.n)], args.threads,
                    args.redo)
            if task == "ioi":
                run("exact-ioi-smollm2-135m", [*EXACT, "--n", str(args.n)], args.threads, args.redo)
        run(*SCALE, args.threads, args.redo)
    sections = [("Task performance", performance_table()), ("Edge circuits", table("edge")),
                ("Node circuits", table("node")), ("Exact patching, SmolLM2-135M", exact_table()),
                ("32 prompts, both rankings", scale_table())]
    if not args.table_only or (OUT / "tiny.md").exists():
        if not args.table_only:
            import torch

            torch.set_num_threads(args.threads)
            (OUT / "tiny.md").write_text(tiny() + "\n", encoding="utf-8")
            (OUT / "estimate.md").write_text(estimate() + "\n", encoding="utf-8")
        sections += [("Exact patching, every edge of tiny random models (float64, 3 prompts of 7 tokens)",
                      (OUT / "tiny.md").read_text().strip()),
                     ("Memory estimate, Llama-3.1-8B config", "```\n" + (OUT / "estimate.md").read_text().strip()
                      + "\n```")]
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tables.md").write_text(f"# Circuit results ({' '.join(['python bench/circuits.py', *sys.argv[1:]])})"
                                   f"\n\n{text}", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
