"""The ``gim-fast`` command line (also ``python -m gim_fast``).

    gim-fast explain "The capital of France is"
    gim-fast explain "The capital of France is" --target " Paris" --temperature none --model gemma3-270m
    gim-fast explain "The capital of France is" --html paris.html
    gim-fast explain "The capital of France is" --answer " Paris, on the Seine"   # every answer token's sources
    gim-fast explain "The capital of France is" --generate 8 --html answer.html
    gim-fast explain "What is the capital of France?" --chat --generate 8   # in the chat template, the message scored
    gim-fast explain - < report.txt                                   # the text from standard input (or --text-file)
    gim-fast attribute --data prompts.jsonl --out runs/capitals          # a whole data set, resumable
    torchrun --nproc-per-node 4 -m gim_fast attribute --data prompts.jsonl --out runs/capitals
    gim-fast circuit --task ioi --model smollm2-135m --out runs/ioi      # circuits: GIM vs EAP vs EAP-IG (MIB metrics)

Exit codes: 0 success, 1 an unexpected failure, 2 a usage error (bad option, unknown model, a target that is
not one token, a missing model package, an unreadable input, a rerun with other settings, a bad row under
--strict).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

import torch

from . import models
from .answers import explain_answer_with, explain_generation_with
from .backends import resolve_backend
from .circuits.cli import add_subparser as add_circuit_subparser
from .cli_args import (
    DTYPES,
    PROG,
    UsageError,
    add_settings_args,
    make_parser,
    positive_int,
    positive_number,
    settings_from_args,
)
from .chat import NoChatTemplate, chat_prompt, special_mask
from .display import LONG_INPUT, format_answer, format_attributions, format_summary, plural, top_positions
from .evaluate.cli import add_subparser as add_evaluate_subparser
from .explain import explain_with
from .html import AnswerView, HtmlRow, write_answer_html, write_html
from .jobs import BadRowError, InputError, JobError, attribute_dataset
from .jobs.runner import DEFAULT_BATCH_TOKENS
from .outputs import check_output_file
from .textfiles import TextFileError, read_text

__all__ = ["main", "build_parser"]

TOP_LONG = 30      # tokens printed for a long input (the largest |score|)

def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", metavar="M",
                        help="'smollm2-135m' (default, shipped), 'gemma3-270m', a local Hugging Face model directory "
                             "or a .gguf file")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where converted models are cached (default $GIM_FAST_CACHE or ~/.cache/gim_fast/models)")


def _add_generate_args(group, exclusive, what: str) -> None:
    """--generate (beside the option that gives the answer) and --answer-target."""
    exclusive.add_argument("--generate", type=positive_int(1), default=None, metavar="N",
                           help=f"the same for the model's own greedy continuation of {what}: at most N tokens, "
                                "stopping at the end-of-sequence token")
    group.add_argument("--answer-target", choices=("logit", "logprob"), default="logit",
                       help="what is explained for each answer token: its raw logit (default) or its log-probability")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        prog=PROG, description="Fast, faithful GIM attributions for Hugging Face language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = make_parser(
        sub, "explain", help="attribute the next-token logit to the input tokens",
        description="Attribute the logit of a target token at the last position to each input token with GIM "
                    "and print one line per token with its score.",
        epilog="Settings not given keep gim_fast.explain's defaults; 'none' turns a modification off.")
    ex.add_argument("text", metavar="TEXT", nargs="?", default=None,
                    help="the input text; '-' reads it from standard input (or give --text-file)")
    ex.add_argument("--text-file", default=None, metavar="PATH",
                    help="read the input text from PATH (UTF-8; the whole file, its last line break dropped)")
    ex.add_argument("--chat", action="store_true",
                    help="TEXT is the user's message: put it in the tokenizer's chat template (with the generation "
                         "prompt, so the target is the start of the model's reply) and score the message's tokens "
                         "only; the template's tokens are shown as special with score 0 (refused for a model "
                         "without a chat template)")
    ex.add_argument("--target", default=None, metavar="TOKEN|ID",
                    help="the token to explain: a string that is one token (e.g. ' Paris') or an integer token id; "
                         "default: the model's own top prediction")
    answer = ex.add_argument_group("a whole answer (gim_fast.explain_answer)")
    given = answer.add_mutually_exclusive_group()
    given.add_argument("--answer", default=None, metavar="ANSWER",
                       help="attribute every token of ANSWER (the text that follows TEXT, tokenized alone, e.g. "
                            "' Paris is the capital') to the tokens before it, and print each answer token with its "
                            "top source tokens")
    _add_generate_args(answer, given, "TEXT")
    answer.add_argument("--top", type=positive_int(1), default=3, metavar="K",
                        help="source tokens shown per answer token (default 3)")
    _add_model_args(ex)
    add_settings_args(ex)
    ex.add_argument("--html", default=None, metavar="FILE",
                    help="also write the tokens coloured by score to FILE, a self-contained HTML page")
    ex.add_argument("--width", type=positive_int(0), default=40, metavar="N",
                    help="length of the longest bar (default 40; special tokens such as <bos> are not on the bars' "
                         "scale and show their score only)")
    ex.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="color the bars (default auto: when writing to a terminal and NO_COLOR is unset)")
    ex.add_argument("--all-tokens", action="store_true",
                    help=f"print one line per token also for a long input (default: from {LONG_INPUT} tokens on, "
                         f"the {TOP_LONG} tokens with the largest |score| and a summary)")
    ex.set_defaults(func=_cmd_explain)

    at = make_parser(
        sub, "attribute", help="attribute every row of a data set; Parquet shards, resumable, multi-process",
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
               "target_given; with --answer-field/--generate: id, line, text, token_ids, tokens, answer, answer_ids, "
               "answer_tokens, answer_given, scores (list<list<float32>>), answer_logits, answer_logprobs. Example: "
               "gim-fast attribute --data prompts.jsonl --out runs/x --target-field target")
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
    answers = at.add_argument_group("whole answers instead of one next token (gim_fast.explain_answer)")
    source = answers.add_mutually_exclusive_group()
    source.add_argument("--answer-field", default=None, metavar="NAME",
                        help="a column holding each row's answer (the text that follows it, tokenized alone): every "
                             "answer token is attributed to the row's and the answer's earlier tokens; the output "
                             "gets answer, answer_ids, answer_tokens, answer_given, answer_logits, answer_logprobs "
                             "and scores as a matrix (list<list<float32>>: one row per answer token)")
    _add_generate_args(answers, source, "each row")
    io.add_argument("--html-report", type=positive_int(0), default=0, metavar="N",
                    help="write OUT/report.html with the first N rows (by input line) as coloured tokens")
    io.add_argument("--chat", action="store_true",
                    help="each row's text is the user's message: put it in the tokenizer's chat template (with the "
                         "generation prompt) and score the message's tokens only; the template's tokens get 0 and "
                         "the output a 'template' column (refused for a model without a chat template)")
    io.add_argument("--strict", action="store_true",
                    help="stop at the first bad row (exit code 2) instead of writing it to OUT/errors.jsonl")
    _add_model_args(at)
    at.add_argument("--device", default=None, metavar="DEV",
                    help="cpu, cuda or cuda:N (default: this process's GPU under torchrun, else cuda if available, "
                         "else cpu)")
    add_settings_args(at)
    at.add_argument("--baseline", default=None, metavar="TOKEN|ID",
                    help="the baseline token (one-token string or id; default: the tokenizer's ' ' token, else its "
                         "pad or unk token)")
    perf = at.add_argument_group("batching and shards")
    perf.add_argument("--batch-tokens", type=positive_int(1), default=None, metavar="N",
                      help=f"padded tokens per batch (default {DEFAULT_BATCH_TOKENS}; rows longer than this get a "
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
    add_evaluate_subparser(sub)
    add_circuit_subparser(sub)
    return parser


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
    with _model_log():
        try:
            return models.load_pretrained(args.model, cache_dir=args.cache_dir, dtype=getattr(torch, args.dtype))
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            raise UsageError(str(e)) from None


def _read_input_text(args) -> str:
    """The text to explain: TEXT, standard input for '-', or --text-file's content (exactly one of them)."""
    if args.text_file is not None:
        if args.text is not None:
            raise UsageError("give the text as TEXT, '-' (standard input) or --text-file PATH, not two of them")
        path = Path(args.text_file)
        if not path.is_file():
            raise UsageError(f"--text-file {args.text_file}: no such file")
        try:
            text = read_text(path)
        except (TextFileError, OSError) as e:
            raise UsageError(f"--text-file {e}" if isinstance(e, TextFileError) else
                             f"--text-file {args.text_file}: cannot read it ({e.strerror or e})") from None
        return text[:-1] if text.endswith("\n") else text
    if args.text is None:
        raise UsageError("no text to explain: give TEXT, '-' to read standard input, or --text-file PATH")
    if args.text == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return text[:-1] if text.endswith("\n") else text
    return args.text


def _check_explain_args(args) -> None:
    """Every argument that can be checked before the model loads (the text is read here: TEXT, '-' or a file)."""
    source = ("--text-file " + args.text_file if args.text_file is not None
              else "standard input" if args.text == "-" else "TEXT")
    args.text = _read_input_text(args)
    if args.text == "":
        raise UsageError(f"{source} is empty; give the text to explain")
    if (args.answer is not None or args.generate is not None) and args.target is not None:
        raise UsageError("--target names the one next token to explain; --answer/--generate explain a whole answer: "
                         "give one or the other")
    if args.answer is not None and not args.answer.strip():
        raise UsageError("--answer is empty: give the answer's text (e.g. ' Paris'), or --generate N")
    target = (args.target or "").strip()
    if target == args.target and target.startswith("-") and target[1:].isdigit():
        raise UsageError(f"--target {args.target}: a token id is >= 0")
    try:
        models.check_model_name(args.model, cache_dir=args.cache_dir)
        if args.html:
            check_output_file(args.html, "--html")
        resolve_backend(args.backend, torch.device("cpu"), getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None


def _cmd_explain(args) -> int:
    _check_explain_args(args)
    model, tokenizer = _load_model(args)

    template = None
    if args.chat:
        try:
            prompt = chat_prompt(tokenizer, args.text)
        except (NoChatTemplate, ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        input_ids, template = torch.tensor(prompt.input_ids), prompt.template
    else:
        input_ids = tokenizer(args.text, return_tensors="pt").input_ids[0]
    if input_ids.numel() == 0:
        raise UsageError("TEXT is empty after tokenization")
    if args.answer is not None or args.generate is not None:
        return _explain_answer(args, model, tokenizer, input_ids, template)
    logits = _last_logits(model, input_ids)
    target_id, how = _resolve_target(args.target, tokenizer, logits)
    rank = int((logits > logits[target_id]).sum()) + 1

    settings = settings_from_args(args)
    try:
        scores = explain_with(model, input_ids, settings, target_token_id=target_id, tokenizer=tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    special = special_mask(tokenizer, input_ids.tolist())
    if template is not None:       # the chat template's tokens are held fixed: not scored, shown as special
        scores = scores.masked_fill(torch.tensor(template, device=scores.device), 0.0)
        special = [s or t for s, t in zip(special, template)]

    shown = _settings_line(settings)
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}), {plural(input_ids.numel(), 'token')}")
    print(f"target: {tokenizer.decode([target_id])!r} (id {target_id}, {how}) after the last token; "
          f"logit {float(logits[target_id]):.4g}, rank {rank}")
    if shown:
        print(f"settings: {shown}")
    if template is not None:
        print(f"chat: the message is {plural(template.count(False), 'token')} of the chat template's "
              f"{plural(len(template), 'token')}; the template's tokens are not scored")
    tokens = [tokenizer.decode([int(i)]) for i in input_ids]
    color = {"auto": None, "always": True, "never": False}[args.color]
    long_input = len(tokens) >= LONG_INPUT and not args.all_tokens
    if long_input:
        print(f"{format_summary(scores, special)}; the {TOP_LONG} with the largest |score|, in text order "
              "(--all-tokens prints every token, --html FILE colours the whole text):")
    only = top_positions(scores, TOP_LONG, special) if long_input else None
    print(format_attributions(tokens, scores, color=color, width=args.width, special=special, only=only))
    if args.html:
        row = HtmlRow(tokens, scores, label=args.text, target=tokenizer.decode([target_id]),
                      target_logit=float(logits[target_id]), token_ids=input_ids.tolist(), special=special)
        try:
            path = write_html(args.html, [row], title=f"GIM attributions: {args.model}", subtitle=shown)
        except OSError as e:
            raise UsageError(f"--html {args.html}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _explain_answer(args, model, tokenizer, input_ids, template=None) -> int:
    """``gim-fast explain TEXT --answer A`` / ``--generate N``: every answer token's top source tokens."""
    settings = settings_from_args(args)
    try:
        if args.answer is not None:
            answer_ids = tokenizer.encode(args.answer, add_special_tokens=False)
            if not answer_ids:
                raise UsageError(f"--answer {args.answer!r} encodes to no token")
            how = "given"
            result = explain_answer_with(model, input_ids, torch.tensor(answer_ids), settings, tokenizer=tokenizer,
                                         target=args.answer_target, chat_template=template)
        else:      # explain_generation tokenizes TEXT as above (in the chat template with --chat)
            result = explain_generation_with(model, tokenizer, args.text, settings, max_new_tokens=args.generate,
                                             target=args.answer_target, chat=args.chat)
            answer_ids = result.target_ids.tolist()
            how = f"generated, greedy, at most {args.generate} tokens"
    except ValueError as e:
        raise UsageError(str(e)) from None
    values = result.target_logits if args.answer_target == "logit" else result.target_logprobs
    shown = _settings_line(settings)
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}), prompt {plural(input_ids.numel(), 'token')}, "
          f"answer {plural(len(answer_ids), 'token')} ({how}): {tokenizer.decode(answer_ids)!r}")
    print(f"explained: each answer token's {args.answer_target}; ← its {args.top} highest-scored source tokens "
          "(position in the prompt, or in the answer)")
    if shown:
        print(f"settings: {shown}")
    color = {"auto": None, "always": True, "never": False}[args.color]
    answer_tokens = result.tokens[input_ids.numel():]
    print(format_answer(result.tokens, answer_tokens, result.scores, values, top=args.top, color=color))
    if args.html:
        view = AnswerView(sources=result.tokens, answer_tokens=answer_tokens, scores=result.scores, label=args.text,
                          joiner="", special=_answer_special(tokenizer, input_ids.tolist(), answer_ids, result))
        try:
            path = write_answer_html(args.html, [view], title=f"GIM attributions of an answer: {args.model}",
                                     subtitle=f"each answer token's {args.answer_target}; {shown}")
        except OSError as e:
            raise UsageError(f"--html {args.html}: cannot write it ({e.strerror or e})") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _answer_special(tokenizer, prompt_ids: list[int], answer_ids: list[int], result) -> list[bool]:
    """Per column of an answer attribution: a special token, or a chat template's token."""
    special = special_mask(tokenizer, [*prompt_ids, *answer_ids])
    if result.template_mask is not None:
        special = [s or bool(t) for s, t in zip(special, result.template_mask.tolist())]
    return special


def _cmd_attribute(args) -> int:
    settings = settings_from_args(args)
    optional = {"batch_tokens": args.batch_tokens, "shard_rows": args.shard_rows,
                "flush_seconds": args.flush_seconds}
    try:
        run = attribute_dataset(
            args.data, args.model, out=args.out, format=args.format, text_field=args.text_field,
            target_field=args.target_field, id_field=args.id_field, target_type=args.target_type,
            batch_size=args.batch_size, max_length=args.max_length, strict=args.strict,
            baseline_token=args.baseline, dtype=getattr(torch, args.dtype), device=args.device,
            cache_dir=args.cache_dir, html_report=args.html_report, progress=args.progress,
            answer_field=args.answer_field, generate=args.generate, answer_target=args.answer_target,
            chat=args.chat, settings=settings, **{k: v for k, v in optional.items() if v is not None})
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


def _settings_line(settings) -> str:
    """The GIM settings in effect, ``name=value`` each."""
    return " ".join(f"{name}={value}" for name, value in settings.as_dict().items())


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
