"""The ``gim-fast`` command line (also ``python -m gim_fast``).

    gim-fast explain "The capital of France is"
    gim-fast explain "The capital of France is" --target " Paris" --temperature none --model gemma3-270m
    gim-fast explain "The capital of France is" --html paris.html
    gim-fast attribute --data prompts.jsonl --out runs/capitals          # a whole data set, resumable
    torchrun --nproc-per-node 4 -m gim_fast attribute --data prompts.jsonl --out runs/capitals

Exit codes: 0 success, 1 an unexpected failure, 2 a usage error (bad option, unknown model, a target that is
not one token, a missing model package, an unreadable input, a rerun with other settings, a bad row under
--strict).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import sys

from .cli_args import (BACKENDS, DTYPES, PROG, UsageError, optional_number, positive_int,  # noqa: F401
                       positive_number)

__all__ = ["main", "build_parser"]

_UNSET = object()
# CLI option -> keyword of gim_fast.explain
_SETTINGS = {"temperature": "softmax_temperature", "q_scale": "q_scale", "k_scale": "k_scale",
             "v_scale": "v_scale", "gate_scale": "gate_scale", "up_scale": "up_scale"}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", metavar="M",
                        help="'smollm2-135m' (default, shipped), 'gemma3-270m', a local Hugging Face model directory "
                             "or a .gguf file")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where converted models are cached (default $GIM_FAST_CACHE or ~/.cache/gim_fast/models)")


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    """The GIM settings, each with the library's default; 'none' turns a modification off."""
    group = parser.add_argument_group("GIM settings ('none' turns a modification off)")
    group.add_argument("--temperature", type=optional_number(0.0, strict=True), default=_UNSET, metavar="T|none",
                       help="softmax temperature of the attention backward (default 2.0)")
    for name, default in (("q-scale", 0.25), ("k-scale", 0.25), ("v-scale", 0.5),
                          ("gate-scale", 0.5), ("up-scale", 0.5)):
        group.add_argument(f"--{name}", type=optional_number(0.0, strict=False), default=_UNSET, metavar="X|none",
                           help=f"gradient scale (default {default})")
    group.add_argument("--no-freeze-norm", dest="freeze_norm", action="store_false",
                       help="let gradients flow through the normalisation statistics (default: frozen)")
    group.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Fast, faithful GIM attributions for Hugging Face language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "explain", help="attribute the next-token logit to the input tokens",
        description="Attribute the logit of a target token at the last position to each input token with GIM "
                    "and print one line per token with its score.",
        epilog="Settings not given keep gim_fast.explain's defaults; 'none' turns a modification off.")
    ex.add_argument("text", metavar="TEXT", help="the input text")
    ex.add_argument("--target", default=None, metavar="TOKEN|ID",
                    help="the token to explain: a string that is one token (e.g. ' Paris') or an integer token id; "
                         "default: the model's own top prediction")
    _add_model_args(ex)
    _add_settings_args(ex)
    ex.add_argument("--html", default=None, metavar="FILE",
                    help="also write the tokens coloured by score to FILE, a self-contained HTML page")
    ex.add_argument("--width", type=positive_int(0), default=40, metavar="N",
                    help="length of the longest bar (default 40; special tokens such as <bos> are not on the bars' "
                         "scale and show their score only)")
    ex.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="color the bars (default auto: when writing to a terminal and NO_COLOR is unset)")
    ex.set_defaults(func=_cmd_explain)

    at = sub.add_parser(
        "attribute", help="attribute every row of a data set; Parquet shards, resumable, multi-process",
        description="Attribute the next-token logit of every row of a data set to its tokens with GIM. Rows are "
                    "grouped by length into batches under a token budget; results go to Parquet shards in "
                    "OUT/data/ with OUT/manifest.json (model, settings, versions, row counts). Bad rows (empty "
                    "text, a malformed line, an unknown target token, too long) go to OUT/errors.jsonl with their "
                    "line number and the reason. Killed at any moment and started again with the same command, "
                    "the job finishes what is missing; another command against an existing OUT is refused. Under "
                    "torchrun or accelerate launch each process computes its share of the rows.",
        epilog="Inputs: JSON Lines (.jsonl/.json/.ndjson: an object per line, or a JSON string), CSV (.csv), TSV "
               "(.tsv), Parquet (.parquet/.pq) or plain text (.txt: one prompt per line). Output columns: id, "
               "line, text, token_ids, tokens, scores (float32), target_id, target, target_logit, target_position, "
               "target_given. Example: gim-fast attribute --data prompts.jsonl --out runs/x --target-field target")
    io = at.add_argument_group("input and output")
    io.add_argument("--data", required=True, metavar="FILE", help="the input file")
    io.add_argument("--out", required=True, metavar="DIR", help="the output directory (created; resumed if it "
                                                                "holds this job)")
    io.add_argument("--format", choices=("jsonl", "csv", "tsv", "parquet", "text"), default=None,
                    help="input format (default: from the file's suffix)")
    io.add_argument("--text-field", default="text", metavar="NAME", help="the column holding the text (default text)")
    io.add_argument("--target-field", default=None, metavar="NAME",
                    help="a column holding each row's target token (a one-token string like ' Paris', or an id); "
                         "rows without one, or without this option, explain the model's top prediction")
    io.add_argument("--target-type", choices=("auto", "token", "id"), default="auto",
                    help="how to read targets: auto (default: integers and digit strings are ids, other strings "
                         "tokens), token (strings are always tokens, also '42') or id")
    io.add_argument("--id-field", default=None, metavar="NAME",
                    help="a column holding each row's id (default: the row's 'id' field when it has one, else its "
                         "line number)")
    io.add_argument("--html-report", type=positive_int(0), default=0, metavar="N",
                    help="write OUT/report.html with the first N rows (by input line) as coloured tokens")
    io.add_argument("--strict", action="store_true",
                    help="stop at the first bad row (exit code 2) instead of writing it to OUT/errors.jsonl")
    _add_model_args(at)
    at.add_argument("--device", default=None, metavar="DEV",
                    help="cpu, cuda or cuda:N (default: this process's GPU under torchrun, else cuda if available, "
                         "else cpu)")
    _add_settings_args(at)
    at.add_argument("--baseline", default=None, metavar="TOKEN|ID",
                    help="the baseline token (one-token string or id; default: the tokenizer's ' ' token, else its "
                         "pad or unk token)")
    perf = at.add_argument_group("batching and shards")
    perf.add_argument("--batch-tokens", type=positive_int(1), default=None, metavar="N",
                      help=f"padded tokens per batch (default {_default_batch_tokens()}; rows longer than this get a "
                           "batch of their own); raise it on a GPU")
    perf.add_argument("--batch-size", type=positive_int(1), default=None, metavar="N",
                      help="at most N rows per batch (default: no limit; 1 attributes one row at a time)")
    perf.add_argument("--max-length", type=positive_int(1), default=None, metavar="N",
                      help="rows with more tokens are bad rows (default: the model's max_position_embeddings)")
    perf.add_argument("--shard-rows", type=positive_int(1), default=None, metavar="N",
                      help="write a shard after N rows (default 10000); a killed job redoes at most the unwritten rows")
    perf.add_argument("--flush-seconds", type=positive_number(finite=False), default=None, metavar="S",
                      help="write a shard after S seconds of work at the latest (default 600)")
    at.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="show the progress bar (default: when stderr is a terminal)")
    at.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")
    at.set_defaults(func=_cmd_attribute)
    from .evaluate.cli import add_subparser as _add_evaluate   # gim-fast evaluate (gim_fast/evaluate/cli.py)
    _add_evaluate(sub)
    return parser


def _default_batch_tokens() -> int:
    from .jobs.runner import DEFAULT_BATCH_TOKENS

    return DEFAULT_BATCH_TOKENS


def _explain_function():
    import gim_fast

    fn = getattr(gim_fast, "explain", None)
    if fn is not None and not callable(fn):       # the submodule, if the package does not re-export it
        fn = getattr(fn, "explain", None)
    if fn is None:
        raise RuntimeError("gim_fast.explain is not available in this installation")
    return fn


def _resolve_target(target: str | None, tokenizer, logits) -> tuple[int, str]:
    """The target token id and how it was chosen."""
    vocab = logits.shape[-1]
    if target is None:
        return int(logits.argmax()), "the model's top prediction"
    text = target.strip()
    if text.lstrip("-").isdigit() and text == target:
        token_id = int(text)
        if not 0 <= token_id < vocab:
            raise UsageError(f"--target {target}: token id out of range (the vocabulary has {vocab} ids)")
        return token_id, "given as an id"
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = ", ".join(repr(tokenizer.decode([i])) for i in ids) or "nothing"
        raise UsageError(f"--target {target!r} is not a single token: it tokenizes to {len(ids)} tokens "
                         f"({pieces}); give one of them, or a token id")
    return ids[0], "given"


def _last_logits(model, input_ids):
    import torch

    with torch.no_grad():
        try:
            out = model(input_ids=input_ids[None], logits_to_keep=1)
        except TypeError:                           # a model without logits_to_keep
            out = model(input_ids=input_ids[None])
    return out.logits[0, -1].float()


@contextlib.contextmanager
def _model_log():
    """Show gim_fast.models' messages (the one-time conversion) on stderr while a model loads."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    models_log = logging.getLogger("gim_fast.models")
    level = models_log.level
    models_log.addHandler(handler)
    models_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        models_log.removeHandler(handler)
        models_log.setLevel(level)


def _load_model(args):
    import torch

    from .models import load_pretrained

    with _model_log():
        try:
            return load_pretrained(args.model, cache_dir=args.cache_dir, dtype=getattr(torch, args.dtype))
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            raise UsageError(str(e)) from None


def _settings_kwargs(args) -> dict:
    kwargs = {"freeze_norm": args.freeze_norm, "backend": args.backend}
    for option, keyword in _SETTINGS.items():
        value = getattr(args, option)
        if value is not _UNSET:
            kwargs[keyword] = value
    return kwargs


def _check_explain_args(args) -> None:
    """Every argument that can be checked before the model loads."""
    import torch

    from .models import check_model_name
    from .outputs import check_output_file
    from .settings import resolve_backend

    if args.text == "":
        raise UsageError("TEXT is empty; give the text to explain")
    target = (args.target or "").strip()
    if target == args.target and target.startswith("-") and target[1:].isdigit():
        raise UsageError(f"--target {args.target}: a token id is >= 0")
    try:
        check_model_name(args.model, cache_dir=args.cache_dir)
        if args.html:
            check_output_file(args.html, "--html")
        resolve_backend(args.backend, torch.device("cpu"), getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None


def _cmd_explain(args) -> int:
    from .display import format_attributions, plural

    _check_explain_args(args)
    model, tokenizer = _load_model(args)

    input_ids = tokenizer(args.text, return_tensors="pt").input_ids[0]
    if input_ids.numel() == 0:
        raise UsageError("TEXT is empty after tokenization")
    logits = _last_logits(model, input_ids)
    target_id, how = _resolve_target(args.target, tokenizer, logits)
    rank = int((logits > logits[target_id]).sum()) + 1

    explain = _explain_function()
    kwargs = _settings_kwargs(args)
    try:
        scores = explain(model, input_ids, target_token_id=target_id, tokenizer=tokenizer, **kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None

    shown = _settings_line(explain, kwargs)
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}), {plural(input_ids.numel(), 'token')}")
    print(f"target: {tokenizer.decode([target_id])!r} (id {target_id}, {how}) after the last token; "
          f"logit {float(logits[target_id]):.4g}, rank {rank}")
    if shown:
        print(f"settings: {shown}")
    tokens = [tokenizer.decode([int(i)]) for i in input_ids]
    special = _special_mask(tokenizer, input_ids.tolist())
    color = {"auto": None, "always": True, "never": False}[args.color]
    print(format_attributions(tokens, scores, color=color, width=args.width, special=special))
    if args.html:
        from .html import HtmlRow, write_html

        row = HtmlRow(tokens, scores, label=args.text, target=tokenizer.decode([target_id]),
                      target_logit=float(logits[target_id]), token_ids=input_ids.tolist(), special=special)
        try:
            path = write_html(args.html, [row], title=f"GIM attributions: {args.model}", subtitle=shown)
        except OSError as e:
            raise UsageError(f"--html {args.html}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _special_mask(tokenizer, token_ids: list[int]) -> list[bool]:
    """Which tokens are the tokenizer's special tokens (<bos>, <eos>, ...): shown, but not on the display scale."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return [i in special for i in token_ids]


def _cmd_attribute(args) -> int:
    import torch

    from .jobs import BadRowError, InputError, JobError, attribute_dataset

    kwargs = _settings_kwargs(args)
    optional = {"batch_tokens": args.batch_tokens, "shard_rows": args.shard_rows,
                "flush_seconds": args.flush_seconds}
    try:
        run = attribute_dataset(
            args.data, args.model, out=args.out, format=args.format, text_field=args.text_field,
            target_field=args.target_field, id_field=args.id_field, target_type=args.target_type,
            batch_size=args.batch_size, max_length=args.max_length, strict=args.strict,
            baseline_token=args.baseline, dtype=getattr(torch, args.dtype), device=args.device,
            cache_dir=args.cache_dir, html_report=args.html_report, progress=args.progress,
            **{k: v for k, v in optional.items() if v is not None}, **kwargs)
        with _model_log():
            summary = run.run()
    except (InputError, JobError, BadRowError) as e:
        raise UsageError(str(e)) from None
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    except ValueError as e:     # a bad setting, an unsupported model, a bad baseline token
        raise UsageError(str(e)) from None
    _print_summary(run, summary)
    return 0


def _print_summary(run, summary: dict) -> None:
    """What the job did: this process's share and speed, and (from the manifest) the whole job."""
    import os

    from .display import plural

    who = f"rank {summary['rank']} of {summary['world_size']}: " if summary["world_size"] > 1 else ""
    done = summary["already_done_batches"]
    resumed = f" ({plural(done, 'batch')} {'was' if done == 1 else 'were'} already done)" if done else ""
    print(f"{PROG}: {who}attributed {plural(summary['rows'], 'row')} ({plural(summary['tokens'], 'token')}, "
          f"{plural(summary['batches'], 'batch')}) "
          f"in {summary['seconds']:.1f} s (+{summary['setup_seconds']:.1f} s loading and planning): "
          f"{summary['rows_per_s']:.1f} rows/s, {summary['tokens_per_s']:.0f} tokens/s{resumed}")
    if summary["rank"] != 0:
        return
    out = summary["out"]
    manifest = run.manifest or {}
    counts = manifest.get("counts", {})
    if run.errors:
        first = run.errors[0]
        print(f"{PROG}: {plural(len(run.errors), 'bad row')} set aside in {os.path.join(out, 'errors.jsonl')} "
              f"(first: line {first.line}: {first.reason})")
    if manifest.get("status") == "complete":
        report = manifest.get("files", {}).get("report")
        extra = f", report {os.path.join(out, report)}" if report else ""
        print(f"{PROG}: complete: {counts.get('rows')} of {plural(counts.get('input_rows'), 'input row')} in "
              f"{plural(counts.get('shards'), 'shard')} under {os.path.join(out, 'data')}, manifest "
              f"{os.path.join(out, 'manifest.json')}{extra}")
    else:
        print(f"{PROG}: not complete yet (other processes are still working); run the same command again to "
              "finish it")


def _settings_line(explain, kwargs: dict) -> str:
    """The GIM settings in effect: explain()'s defaults overridden by what was given."""
    try:
        params = inspect.signature(explain).parameters
    except (TypeError, ValueError):
        params = {}
    names = ("freeze_norm", *_SETTINGS.values(), "backend")
    parts = []
    for name in names:
        if name in kwargs:
            value = kwargs[name]
        elif name in params and params[name].default is not inspect.Parameter.empty:
            value = params[name].default
        else:
            continue
        parts.append(f"{name}={value}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
