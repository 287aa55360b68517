"""``gim-fast circuit``: circuit discovery and its MIB-style faithfulness from the command line.

    gim-fast circuit --task ioi --model smollm2-135m --methods gim,eap,eap-ig,random --n 32 --out runs/ioi
    gim-fast circuit --task my_task.jsonl --model gemma3-270m --levels edge --out runs/mine
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..cli_args import DTYPES, UsageError, add_list_argument, make_parser, positive_int, positive_number
from ..memory import InsufficientMemoryError
from .. import models
from ..progress import Progress
from ..outputs import check_empty_output_dir, check_output_dir, run_environment
from .attribution import DEFAULT_IG_STEPS, METHODS
from .graph import PERCENTAGES
from .report import markdown_summary, write_results
from .run import discover
from .tasks import TASKS, read_task_file

__all__ = ["add_subparser", "run"]

# The most examples one run takes: each is scored by every method and run through every circuit size, so more
# would run for days on a CPU (and the generated tasks repeat their templates long before).
MAX_EXAMPLES = 10_000
_RANKINGS = {"signed": ("signed",), "absolute": ("absolute",), "both": ("signed", "absolute")}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _percent(text: str) -> float:
    value = positive_number(finite=True)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], got {text!r}")
    return value


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``circuit`` on the ``gim-fast`` sub-command parsers."""
    p = make_parser(
        subparsers, "circuit",
        help="circuit discovery (edge attribution patching with GIM, EAP, EAP-IG) and its faithfulness",
        description="Score every edge of the model's graph (embedding, attention heads with their q/k/v inputs, "
                    "MLPs, logits) by attribution patching on a task of clean/corrupt prompt pairs, then measure "
                    "the faithfulness of the top-k% circuits as the MIB benchmark's circuit track does: f(k) = "
                    "(m(C) - m(empty)) / (m(full) - m(empty)), CPR = area under f (higher is better), CMD = area "
                    "under |1 - f| (lower is better). Writes OUT/summary.csv, OUT/curve.csv, OUT/edges.parquet, "
                    "OUT/faithfulness.png, OUT/circuit.html (the circuit drawn: pick a size and a method, point at "
                    "a node or an edge for its score) and OUT/run.json.",
        epilog="Tasks: ioi (ABBA/BABA templates, corrupt prompts with three other names; m = logit(IO) - "
               "logit(S)), greater-than (m = probability of the years after YY minus up to YY), capitals "
               "(country pairs the model knows; m = logit difference of the two capitals), or a JSON Lines file "
               "with 'clean', 'corrupt', 'answer' and 'corrupt_answer' per line (equal token lengths, one-token "
               "answers).")
    p.add_argument("--task", required=True, metavar="ioi|greater-than|capitals|FILE.jsonl", help="the task")
    p.add_argument("--model", default="smollm2-135m", metavar="M",
                   help="'smollm2-135m' (default), 'gemma3-270m', a Hugging Face model directory or a .gguf file")
    add_list_argument(p, "--methods", choices=METHODS, default=["gim", "eap", "eap-ig", "random"], metavar="M",
                      help="scoring methods among gim, eap, eap-ig, random, separated by spaces or commas "
                           "(default: all)")
    add_list_argument(p, "--levels", choices=("edge", "node"), default=["edge", "node"], metavar="L",
                      help="circuit levels: edge, node or both (default)")
    p.add_argument("--n", type=positive_int(1), default=32, metavar="N", help="examples (default 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, new or empty (created)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder that already holds files (replacing the files of the same names)")
    p.add_argument("--ranking", choices=("signed", "absolute", "both"), default="signed",
                   help="rank edges (nodes) by score (signed, default), by |score| (absolute) or evaluate both; the "
                        "MIB benchmark reports CPR with the signed ranking and CMD with the absolute one")
    p.add_argument("--absolute", dest="ranking", action="store_const", const="absolute",
                   help="the same as --ranking absolute")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="keep circuits as selected (default: prune nodes without incoming or outgoing edges, as MIB)")
    add_list_argument(p, "--percentages", item=_percent, default=list(PERCENTAGES), metavar="P",
                      help="circuit sizes in percent (default: MIB's 0.1 0.2 0.5 1 2 5 10 20 50 100)")
    p.add_argument("--ig-steps", type=positive_int(1), default=DEFAULT_IG_STEPS, metavar="M",
                   help=f"EAP-IG interpolation steps (default {DEFAULT_IG_STEPS})")
    p.add_argument("--exact-edges", type=positive_int(0), default=0, metavar="K",
                   help="also patch K randomly chosen edges one at a time and report each method's rank correlation "
                        "with these exact effects (default 0: skip; one forward pass per edge and batch)")
    p.add_argument("--batch-size", type=positive_int(1), default=16, metavar="B", help="prompts per forward pass (default 16)")
    p.add_argument("--min-accuracy", type=_fraction, default=0.6, metavar="A",
                   help="refuse a task the model answers right less often than this, or whose corrupt prompts do "
                        "not lower the metric (default 0.6; chance is 0.5; 0: no check)")
    p.add_argument("--seed", type=int, default=0, help="task generation, edge sampling, the random method")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="converted-model cache (default $GIM_FAST_CACHE or ~/.cache/gim_fast/models)")
    p.add_argument("--threads", type=positive_int(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    # every argument is checked before the model loads
    if args.task not in TASKS and not Path(args.task).is_file():
        raise UsageError(f"--task: unknown task {args.task!r}; expected one of {', '.join(TASKS)} or a .jsonl file"
                         if not args.task.endswith((".jsonl", ".json", ".ndjson")) else
                         f"--task: no such task file: {args.task!r}")
    if args.n > MAX_EXAMPLES:
        raise UsageError(f"--n {args.n}: at most {MAX_EXAMPLES:,} examples (each is scored by every method and run "
                         f"through every circuit size; the MIB benchmark uses hundreds); give --n {MAX_EXAMPLES} or "
                         "fewer")
    try:
        if args.task not in TASKS:
            read_task_file(args.task, args.n)           # UTF-8, JSON and fields, line by line
        check_output_dir(args.out)
        if not args.overwrite:
            check_empty_output_dir(args.out)
        models.check_model_name(args.model, cache_dir=args.cache_dir)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = models.load_pretrained(args.model, cache_dir=args.cache_dir, dtype=getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    bars = []

    def bar(total: int, desc: str):
        b = Progress(total, desc, prefix="gim-fast circuit", enabled=not args.quiet)
        bars.append(b)
        return b.update

    try:
        result = discover(model, tokenizer, args.task, model_name=args.model, methods=args.methods,
                          levels=args.levels, n=args.n, seed=args.seed, ig_steps=args.ig_steps,
                          batch_size=args.batch_size, rankings=_RANKINGS[args.ranking], prune=args.prune,
                          percentages=args.percentages, exact_edges=args.exact_edges,
                          min_accuracy=args.min_accuracy, bar=bar)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, InsufficientMemoryError) as e:
        raise UsageError(str(e)) from None
    finally:
        for b in bars:
            b.close()
    files = write_results(result, args.out, command=_command(args), environment=run_environment())
    print(markdown_summary(result))
    print(f"\nwrote {', '.join(str(f) for f in files.values())}")
    return 0


def _command(args) -> str:
    parts = ["gim-fast", "circuit", "--task", args.task, "--model", args.model, "--methods", ",".join(args.methods),
             "--levels", ",".join(args.levels), "--n", str(args.n), "--seed", str(args.seed),
             "--batch-size", str(args.batch_size), "--out", args.out]
    if args.ranking != "signed":
        parts += ["--ranking", args.ranking]
    if not args.prune:
        parts.append("--no-prune")
    if args.exact_edges:
        parts += ["--exact-edges", str(args.exact_edges)]
    if args.ig_steps != 5:
        parts += ["--ig-steps", str(args.ig_steps)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)
