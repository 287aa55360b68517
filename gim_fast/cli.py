"""The ``gim-fast`` command line (also ``python -m gim_fast``).

    gim-fast explain "The capital of France is"
    gim-fast explain "The capital of France is" --target " Paris" --temperature none --model gemma3-270m

Exit codes: 0 success, 1 an unexpected failure, 2 a usage error (bad option, unknown model, a target that is
not one token, a missing model package).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys

__all__ = ["main", "build_parser"]

PROG = "gim-fast"
_UNSET = object()
_BACKENDS = ("auto", "eager", "torch", "triton")
_DTYPES = ("float32", "bfloat16", "float16")
# CLI option -> keyword of gim_fast.explain
_SETTINGS = {"temperature": "softmax_temperature", "q_scale": "q_scale", "k_scale": "k_scale",
             "v_scale": "v_scale", "gate_scale": "gate_scale", "up_scale": "up_scale"}


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def _optional_number(minimum: float, strict: bool):
    """argparse type: 'none' (or 'off') → None, else a finite float > minimum (strict) or >= minimum."""
    def parse(text: str):
        if text.strip().lower() in ("none", "off"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) \
                or (value <= minimum if strict else value < minimum):
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"expected a finite number {relation} {minimum:g} or 'none', "
                                             f"got {text!r}")
        return value
    parse.__name__ = "number or none"
    return parse


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
    ex.add_argument("--model", default="smollm2-135m", metavar="M",
                    help="'smollm2-135m' (default), 'gemma3-270m', a Hugging Face model directory or a .gguf file")
    ex.add_argument("--target", default=None, metavar="TOKEN|ID",
                    help="the token to explain: a string that is one token (e.g. ' Paris') or an integer token id; "
                         "default: the model's own top prediction")
    number = _optional_number
    ex.add_argument("--temperature", type=number(0.0, strict=True), default=_UNSET, metavar="T|none",
                    help="softmax temperature of the attention backward (default 2.0)")
    for name, default in (("q-scale", 0.25), ("k-scale", 0.25), ("v-scale", 0.5),
                          ("gate-scale", 0.5), ("up-scale", 0.5)):
        ex.add_argument(f"--{name}", type=number(0.0, strict=False), default=_UNSET, metavar="X|none",
                        help=f"gradient scale (default {default})")
    ex.add_argument("--no-freeze-norm", dest="freeze_norm", action="store_false",
                    help="let gradients flow through the normalisation statistics")
    ex.add_argument("--backend", choices=_BACKENDS, default="auto", help="attention backend (default auto)")
    ex.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (default float32)")
    ex.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="where converted models are cached (default $GIM_FAST_CACHE or ~/.cache/gim_fast/models)")
    ex.add_argument("--width", type=int, default=40, help="length of the longest bar (default 40)")
    ex.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="color the bars (default auto: when writing to a terminal and NO_COLOR is unset)")
    ex.set_defaults(func=_cmd_explain)
    return parser


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


def _cmd_explain(args) -> int:
    import torch

    from .display import format_attributions
    from .models import load_pretrained

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    models_log = logging.getLogger("gim_fast.models")
    models_log.addHandler(handler)
    models_log.setLevel(logging.INFO)
    try:
        model, tokenizer = load_pretrained(args.model, cache_dir=args.cache_dir, dtype=getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    finally:
        models_log.removeHandler(handler)

    input_ids = tokenizer(args.text, return_tensors="pt").input_ids[0]
    if input_ids.numel() == 0:
        raise UsageError("TEXT is empty after tokenization")
    logits = _last_logits(model, input_ids)
    target_id, how = _resolve_target(args.target, tokenizer, logits)
    rank = int((logits > logits[target_id]).sum()) + 1

    explain = _explain_function()
    kwargs = {"freeze_norm": args.freeze_norm, "backend": args.backend}
    for option, keyword in _SETTINGS.items():
        value = getattr(args, option)
        if value is not _UNSET:
            kwargs[keyword] = value
    try:
        scores = explain(model, input_ids, target_token_id=target_id, tokenizer=tokenizer, **kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None

    shown = _settings_line(explain, kwargs)
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}), {input_ids.numel()} tokens")
    print(f"target: {tokenizer.decode([target_id])!r} (id {target_id}, {how}) after the last token; "
          f"logit {float(logits[target_id]):.4g}, rank {rank}")
    if shown:
        print(f"settings: {shown}")
    tokens = [tokenizer.decode([int(i)]) for i in input_ids]
    color = {"auto": None, "always": True, "never": False}[args.color]
    print(format_attributions(tokens, scores, color=color, width=args.width))
    return 0


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
