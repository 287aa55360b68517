"""The README's circuit table: ``gim-fast circuit`` on every task and model, then one markdown table.

    python bench/circuits.py                 # run what is missing, then print the tables (about an hour on 2 CPU cores)
    python bench/circuits.py --table-only    # print the tables from bench/results/circuits/*/summary.csv
    python bench/circuits.py --estimate      # the memory estimate for the Llama-3.1-8B config (no model built)

Each run is ``gim-fast circuit --task T --model M --n 32 --out bench/results/circuits/T-M`` (plus
``--exact-edges 200`` for IOI on SmolLM2: the rank correlation of each method with exact patching of 200 random
edges). The tables show, per method, CPR and CMD of the circuits ranked by score (the issue's definition; MIB
ranks by |score| for CMD: ``--ranking both`` measures that too, at twice the circuit runs), for edge and for node
circuits, and the scoring time per example.
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
EXACT = {("ioi", "smollm2-135m"): 200}


def run(task: str, model: str, n: int, threads: int | None) -> None:
    out = OUT / f"{task}-{model}"
    if (out / "summary.csv").exists():
        return
    command = [str(Path(sys.executable).parent / "gim-fast"), "circuit", "--task", task, "--model", model,
               "--n", str(n), "--out", str(out.relative_to(ROOT))]
    if (task, model) in EXACT:
        command += ["--exact-edges", str(EXACT[task, model])]
    if threads:
        command += ["--threads", str(threads)]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


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
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.estimate:
        estimate()
        return 0
    if not args.table_only:
        for model in MODELS:
            for task in TASKS:
                run(task, model, args.n, args.threads)
    for level in ("edge", "node"):
        print(f"\n{level} circuits\n")
        print(table(level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
