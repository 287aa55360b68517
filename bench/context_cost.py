"""What ``attribute_context`` costs per call, by option, side by side in one process (issue 23's cost table).

    .venv/bin/python bench/context_cost.py --out bench/results/context-tasks/cost.csv

Per repeat, on the written ``entities`` task (8 documents, its fixed answer; ``gim_fast.evaluate.context_tasks``):
the default call (whole answer: one forward, one backward), ``per_token=True`` (one forward, the answer's M
backwards), the default call followed by reading ``token_scores`` (the rows computed when first needed), and
``method="gim-ablations"`` (GIM, then 6 forwards). The calls alternate within each repeat, so that a busy machine
slows all of them alike: compare the ratios.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

import gim_fast
from gim_fast.evaluate.context_tasks import task_examples
from gim_fast.models import load_pretrained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained("smollm2-135m")
    examples = task_examples("entities", args.examples)
    calls = {
        "default (per_token=False)": lambda ex: gim_fast.attribute_context(model, tok, list(ex.sources), ex.query,
                                                                           ex.response),
        "per_token=True": lambda ex: gim_fast.attribute_context(model, tok, list(ex.sources), ex.query, ex.response,
                                                                per_token=True),
        "default, then token_scores": lambda ex: gim_fast.attribute_context(model, tok, list(ex.sources), ex.query,
                                                                            ex.response).token_scores,
        "method='gim-ablations'": lambda ex: gim_fast.attribute_context(model, tok, list(ex.sources), ex.query,
                                                                        ex.response, method="gim-ablations"),
    }
    calls["default (per_token=False)"](examples[0])                     # warm-up
    rows = []
    for repeat in range(args.repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            for ex in examples:
                call(ex)
            seconds = (time.perf_counter() - started) / len(examples)
            rows.append({"repeat": repeat + 1, "call": name, "seconds_per_call": round(seconds, 3)})
            print(f"repeat {repeat + 1}: {name}: {seconds:.3f} s per call", flush=True)
    base = {r["repeat"]: r["seconds_per_call"] for r in rows if r["call"].startswith("default (")}
    for r in rows:
        r["ratio_to_default"] = round(r["seconds_per_call"] / base[r["repeat"]], 2)
        r["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
        r["threads"] = args.threads
        r["torch"] = torch.__version__
        r["python"] = sys.version.split()[0]
        r["date"] = time.strftime("%Y-%m-%d")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
