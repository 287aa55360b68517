"""The README's circuit tables: ``gim-fast circuit`` on every task and model, exact patching, one markdown table.

    python bench/circuits.py                 # run what is missing, then print the tables (CPU: hours on a shared
                                             # 2-core machine; see the README for the time each took)
    python bench/circuits.py --table-only    # print the tables from bench/results/circuits/*/summary.csv
    python bench/circuits.py --estimate      # the memory estimate for the Llama-3.1-8B config (no model built)
    python bench/circuits.py --tiny          # scores vs exact per-edge patching on tiny random models, 7 families

Each table run is ``gim-fast circuit --task T --model M --n 16 --out bench/results/circuits/T-M``: CPR and CMD of
the circuits ranked by score (the issue's definition; MIB ranks by |score| for CMD: ``--ranking both`` measures
that too, at twice the circuit runs), for edge and node circuits, and the scoring time per example. The exact run
patches 150 random edges of SmolLM2 one at a time on 8 IOI prompts and correlates each method's scores with
these effects (``bench/results/circuits/exact-ioi-smollm2-135m``).
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "circuits"
MODELS = ("smollm2-135m", "gemma3-270m")
TASKS = ("ioi", "greater-than", "capitals")
METHODS = ("gim", "eap", "eap-ig", "random")
EXACT = ["--task", "ioi", "--model", "smollm2-135m", "--n", "8", "--levels", "edge", "--percentages", "100",
         "--exact-edges", "150"]


def run(name: str, args: list[str], threads: int | None) -> None:
    out = OUT / name
    if (out / "summary.csv").exists():
        return
    command = [str(Path(sys.executable).parent / "gim-fast"), "circuit", *args, "--out", str(out.relative_to(ROOT)),
               "--quiet"]
    if threads:
        command += ["--threads", str(threads)]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def exact_table() -> str:
    path = OUT / "exact-ioi-smollm2-135m" / "run.json"
    if not path.exists():
        return "(no exact run yet)"
    import json

    exact = json.loads(path.read_text())["exact"]
    lines = [f"{exact['edges']} random edges of SmolLM2-135M, 8 IOI prompts, {exact['seconds']:.0f} s", "",
             "| method | Spearman ρ with exact patching |", "|---|---:|"]
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
    rows = {}
    for task in TASKS:
        for model in MODELS:
            path = OUT / f"{task}-{model}" / "summary.csv"
            if not path.exists():
                continue
            with open(path) as f:
                for r in csv.DictReader(f):
                    if r["level"] == level:
                        rows[task, model, r["method"], r["ranking"]] = r
    columns = [(t, m) for t in TASKS for m in MODELS if (t, m, "gim", "signed") in rows]
    short = {"smollm2-135m": "SmolLM2", "gemma3-270m": "Gemma-3"}
    head = "| method | " + " | ".join(f"{t}, {short[m]}: CPR ↑ | CMD ↓ | s/ex." for t, m in columns) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(columns)]
    for method in METHODS:
        cells = []
        for t, m in columns:
            row = rows.get((t, m, method, "signed"))
            best_cpr = max(float(rows[t, m, x, "signed"]["cpr"]) for x in METHODS if (t, m, x, "signed") in rows)
            best_cmd = min(float(rows[t, m, x, "signed"]["cmd"]) for x in METHODS if (t, m, x, "signed") in rows)
            if row is None:
                cells += ["–", "–", "–"]
                continue
            cpr, cmd = f"{float(row['cpr']):.2f}", f"{float(row['cmd']):.2f}"
            cells += [f"**{cpr}**" if float(row["cpr"]) == best_cpr else cpr,
                      f"**{cmd}**" if float(row["cmd"]) == best_cmd else cmd,
                      f"{float(row['seconds_per_example']):.2f}"]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def estimate() -> None:
    """Llama-3.1-8B (bench/configs.py), bf16: 64 prompts × 32 tokens, and 16 prompts × 512 tokens with every
    layer's Δ expanded and with none."""
    import torch
    from transformers import AutoConfig

    from bench.configs import CONFIGS
    from gim_fast.circuits import Graph, estimate_circuit_memory

    model_type, kwargs = CONFIGS["llama-3.1-8b"]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    weights = 8.03e9 * 2
    print(f"Llama-3.1-8B: {Graph.from_config(cfg)}; weights {weights / 1e9:.1f} GB in bf16")
    for prompts, tokens, layers in ((64, 32, None), (16, 512, None), (16, 512, 0)):
        est = estimate_circuit_memory(cfg, tokens, prompts, dtype=torch.bfloat16, expanded_layers=layers)
        total = (est.total + weights) / 1e9
        print(f"\n{prompts} prompts × {tokens} tokens, bf16, Δ of {'every' if layers is None else 'no'} layer "
              f"expanded: {total:.1f} GB with the weights ({'fits' if total < 80 else 'does not fit'} 80 GB)")
        print(est)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--estimate", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.estimate:
        estimate()
        return 0
    if args.tiny:
        print(tiny())
        return 0
    if not args.table_only:
        for model in MODELS:
            for task in TASKS:
                run(f"{task}-{model}", ["--task", task, "--model", model, "--n", str(args.n)], args.threads)
        run("exact-ioi-smollm2-135m", EXACT, args.threads)
    for level in ("edge", "node"):
        print(f"\n{level} circuits\n")
        print(table(level))
    print("\nexact patching\n")
    print(exact_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
