"""``gim-fast evaluate``: the faithfulness evaluation from the command line.

    gim-fast evaluate                                      # both models, every method, every example
    gim-fast evaluate --models smollm2-135m --methods gim grad_x_input random --n 10 --out /tmp/faith
    gim-fast evaluate --task context                       # which documents answers came from, against ablation
    gim-fast evaluate --task context --documents 10 30 --counts 5 --methods gim leave_one_out random
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..backends import resolve_backend
from ..cli_args import BACKENDS, UsageError, add_list_argument, make_parser, positive_int, positive_number
from ..data import countries
from ..models import check_model_name
from ..outputs import check_empty_output_dir, check_output_dir, run_environment
from .context_methods import CONTEXT_METHODS
from .context_report import markdown_context_table, write_context_results
from .context_run import DEFAULT_COUNTS, DEFAULT_SIZES, evaluate_context
from .methods import DEFAULT_METHODS, METHODS, get_method
from .report import markdown_table, write_results
from .run import (
    DEFAULT_BATCH_SIZE,
    SWEEP_TEMPERATURES,
    _capital_shots,
    evaluate_model,
    jsonl_candidates,
    unavailable_notes,
)

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")
DEFAULT_N = None   # every example the model answers right
TASKS = ("faithfulness", "context")


def default_out(task: str) -> str:
    """A new folder per run, never one that holds committed results: ``runs/evaluate-<task>-<UTC date-time>``."""
    import datetime as dt

    return f"runs/evaluate-{task}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _n(text: str):
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


_positive_temperature = positive_number(finite=True)


def _temperature(text: str):
    """argparse type of one --temperatures value: a finite number > 0, or 'none' (alone: no sweep)."""
    if text.strip().lower() == "none":
        return None
    return _positive_temperature(text)


_temperature.__name__ = "temperature or none"


def _sweep(temperatures: list) -> list[float]:
    """The parsed --temperatures: 'none' must stand alone and means no sweep."""
    if None in temperatures:
        if len(temperatures) > 1:
            raise UsageError("--temperatures: 'none' (no sweep) cannot be combined with temperatures")
        return []
    return temperatures


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``gim-fast`` sub-command parsers."""
    p = make_parser(
        subparsers, "evaluate",
        help="faithfulness of GIM and its peers: comprehensiveness and sufficiency (the GIM paper's)",
        description="Compare attribution methods by the GIM paper's comprehensiveness (mean logit drop when the top-k "
                    "tokens are replaced by the baseline token, k = 1..50; higher is better) and sufficiency (mean "
                    "drop when 50/80/90/95/99% of the least important tokens are replaced; lower is better), both "
                    "divided by the target logit. Writes OUT/summary.csv, OUT/examples.csv, OUT/faithfulness.md "
                    "(method x model table), OUT/temperature_sweep.png/.csv and OUT/run.json.",
        epilog=f"Methods: {', '.join(METHODS)}, and gim_t<T> (GIM at temperature T); attnlrp runs LXT 2.1 in a "
               "worker process from the side install of transformers 4.52 that `make venv` puts in .venv/lxt "
               "(GIM_FAST_LXT points elsewhere). Data: 'capitals' (the prompts "
               "'The capital of {country} is' from the country-capitals package, kept when the model predicts the "
               "capital's first token) or a JSON Lines file with a 'text' and optionally a 'target' per line. "
               "--task context instead asks 'What is the capital of {country}?' over a context of one-sentence "
               "documents (one states the answer) and scores which documents each method says the model's "
               "generated answer came from with ContextCite's top-k drop (k = 1, 3, 5) and LDS (32 random "
               "half-ablations), plus the rank of the gold document; it writes OUT/summary.csv, OUT/examples.csv, "
               "OUT/context.md and OUT/run.json. Context methods: "
               f"{', '.join(CONTEXT_METHODS)}.")
    p.add_argument("--task", choices=TASKS, default="faithfulness",
                   help="faithfulness (default: the GIM paper's metrics on next-token prompts) or context (which "
                        "documents of a context a generated answer came from, against ablation)")
    add_list_argument(p, "--models", default=list(DEFAULT_MODELS), metavar="M",
                      help=f"models to evaluate (default: {' '.join(DEFAULT_MODELS)}); a packaged name, a Hugging "
                           "Face model directory or a .gguf file")
    p.add_argument("--data", default="capitals", metavar="capitals|FILE.jsonl",
                   help="the examples (default: capitals)")
    add_list_argument(p, "--methods", default=None, metavar="METHOD",
                      help=f"methods to compare, separated by spaces or commas (default: all of the task's: "
                           f"{' '.join(DEFAULT_METHODS)}; with --task context: {' '.join(CONTEXT_METHODS)})")
    p.add_argument("--n", type=_n, default=DEFAULT_N, metavar="N|all",
                   help="examples per model: the first N the model answers right, in a seeded random order "
                        "(default: all of them)")
    add_list_argument(p, "--temperatures", item=_temperature, allow_empty=True, default=list(SWEEP_TEMPERATURES),
                      metavar="T", help="GIM softmax temperatures of the sweep (default 1 1.5 2 3 5; 'none' or "
                                        "nothing: no sweep)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, new or empty (default: a new runs/evaluate-<task>-<UTC date and time> "
                        "under the current folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder that already holds files (replacing the files of the same "
                        "names; `make evaluate` rewrites bench/results/faithfulness this way)")
    ctx = p.add_argument_group("--task context")
    add_list_argument(ctx, "--documents", item=positive_int(1), default=list(DEFAULT_SIZES), metavar="N",
                      help=f"context sizes in documents (default {' '.join(map(str, DEFAULT_SIZES))}; 2 to 194)")
    add_list_argument(ctx, "--counts", item=positive_int(1), default=None, metavar="C",
                      help="examples per context size: one per --documents, or one for all (default "
                           f"{' '.join(map(str, DEFAULT_COUNTS))} for the default sizes, else 10 each)")
    ctx.add_argument("--limit", type=positive_int(1), default=None, metavar="Q",
                     help="ask at most Q questions per size while looking for answers the model gets right "
                          "(default: all 193)")
    ctx.add_argument("--keep", choices=("right", "all"), default="right",
                     help="which answers to evaluate: those that name the capital (default), or all of them "
                          "(smoke tests on untrained models)")
    p.add_argument("--seed", type=int, default=0, help="the example order and the random method (default 0)")
    p.add_argument("--batch-size", type=positive_int(1), default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"examples per attribution batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="GIM attention backend (default auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="converted-model cache (default "
                                                                     "$GIM_FAST_CACHE or ~/.cache/gim_fast/models)")
    p.add_argument("--threads", type=positive_int(1), default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.task == "context":
        return run_context(args)
    return run_faithfulness(args)


def _check_models_and_output(args, *, data_check) -> None:
    """What both tasks check before the first model loads: the data's packages or file (``data_check()``), the
    output folder, the backend, every model name."""
    import torch

    try:
        data_check()
        check_output_dir(args.out)
        if not args.overwrite:
            check_empty_output_dir(args.out)
        resolve_backend(args.backend, torch.device("cpu"))      # the models are evaluated where they load
    except (ValueError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    for model in args.models:
        try:
            check_model_name(model, cache_dir=args.cache_dir)
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
            raise UsageError(f"{model}: {e}") from None


def run_faithfulness(args) -> int:
    import torch

    # every argument is checked before the first model loads
    args.methods = list(DEFAULT_METHODS) if args.methods is None else args.methods
    args.out = default_out("faithfulness") if args.out is None else args.out
    args.temperatures = _sweep(args.temperatures)
    for name in args.methods:
        try:
            get_method(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if _capital_shots(args.data) is None and not Path(args.data).is_file():
        raise UsageError(f"--data must be 'capitals', 'capitals-<k>shot' or a JSON Lines file; no such file: "
                         f"{args.data!r}")
    # jsonl_candidates parses the file; countries() needs the packages holding the prompts
    _check_models_and_output(args, data_check=lambda: jsonl_candidates(args.data) if _capital_shots(args.data) is None
                             else countries())
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"gim-fast evaluate: {msg}", file=sys.stderr, flush=True)

    notes = unavailable_notes(args.methods)
    for name, reason in notes.items():
        say(f"{name}: unavailable: {reason}")
    methods = [m for m in args.methods if m not in notes]
    if not methods:
        raise UsageError("every method asked for is unavailable: " + "; ".join(
            f"{name}: {reason}" for name, reason in notes.items()))
    started = time.perf_counter()
    results = []
    for model in args.models:
        try:
            results.append(evaluate_model(model, methods, n=args.n, data=args.data, temperatures=args.temperatures,
                                          seed=args.seed, batch_size=args.batch_size, backend=args.backend,
                                          cache_dir=args.cache_dir, progress=say))
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
            raise UsageError(f"{model}: {e}") from None
    wall = time.perf_counter() - started
    failed = {f"{r.model}: {name}": m.unavailable for r in results for name, m in r.methods.items() if m.unavailable}
    if len(failed) == sum(len(r.methods) for r in results):
        print("gim-fast evaluate: no method computed any score, nothing written: " + "; ".join(
            f"{name}: unavailable: {reason}" for name, reason in failed.items()), file=sys.stderr)
        return 1

    command = _command(args)
    files = write_results(results, Path(args.out), command=command, environment=run_environment(),
                          notes=notes, data=args.data, seed=args.seed, wall_seconds=wall)

    print(markdown_table(results, notes))
    print(f"\nwall time {wall:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def run_context(args) -> int:
    import torch

    methods = list(CONTEXT_METHODS) if args.methods is None else args.methods
    for name in methods:
        if name not in CONTEXT_METHODS:
            raise UsageError(f"--task context: unknown method {name!r}; accepted: {', '.join(CONTEXT_METHODS)}")
    for documents in args.documents:
        if documents < 2 or documents > 194:
            raise UsageError(f"--documents {documents}: a context holds 2 to 194 documents")
    counts = args.counts
    if counts is None:
        counts = list(DEFAULT_COUNTS) if args.documents == list(DEFAULT_SIZES) else [10] * len(args.documents)
    elif len(counts) == 1:
        counts = counts * len(args.documents)
    elif len(counts) != len(args.documents):
        raise UsageError(f"--counts has {len(counts)} values for {len(args.documents)} --documents sizes; give one "
                         "per size, or one for all")
    args.out = default_out("context") if args.out is None else args.out

    _check_models_and_output(args, data_check=countries)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"gim-fast evaluate: {msg}", file=sys.stderr, flush=True)

    parts = ["gim-fast", "evaluate", "--task", "context", "--models", *args.models, "--documents",
             *map(str, args.documents), "--counts", *map(str, counts), "--methods", *methods, "--seed",
             str(args.seed), "--out", str(out)]
    if args.limit:
        parts += ["--limit", str(args.limit)]
    if args.keep != "right":
        parts += ["--keep", args.keep]
    if args.backend != "auto":
        parts += ["--backend", args.backend]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.overwrite:
        parts.append("--overwrite")
    command = " ".join(shlex.quote(p) for p in parts)
    started = time.perf_counter()
    results = []

    def write(partial=None):      # after every context size: a long run leaves its results so far
        done = results + ([partial] if partial is not None else [])
        return write_context_results(done, out, command=command, environment=run_environment(), seed=args.seed,
                                     wall_seconds=time.perf_counter() - started)

    for model in args.models:
        try:
            results.append(evaluate_context(model, methods, sizes=args.documents, counts=counts, seed=args.seed,
                                            limit=args.limit, backend=args.backend, cache_dir=args.cache_dir,
                                            keep_wrong=args.keep == "all", progress=say, checkpoint=write))
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
            raise UsageError(f"{model}: {e}") from None
    files = write()
    wall = time.perf_counter() - started
    print(markdown_context_table(results))
    print(f"\nwall time {wall:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def _command(args) -> str:
    """The command that reproduces this run, every option spelled out."""
    parts = ["gim-fast", "evaluate", "--models", *args.models, "--data", args.data, "--methods", *args.methods,
             "--n", "all" if args.n is None else str(args.n),
             "--temperatures", *([f"{t:g}" for t in args.temperatures] or ["none"]),
             "--seed", str(args.seed), "--out", args.out]
    if args.batch_size != DEFAULT_BATCH_SIZE:
        parts += ["--batch-size", str(args.batch_size)]
    if args.backend != "auto":
        parts += ["--backend", args.backend]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.overwrite:
        parts.append("--overwrite")
    return " ".join(shlex.quote(p) for p in parts)
