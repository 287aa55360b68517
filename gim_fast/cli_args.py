"""What the command lines share (``gim-fast explain|attribute`` in ``gim_fast.cli``, ``gim-fast evaluate`` in
``gim_fast.evaluate.cli``, and any later subcommand): the usage error, the argparse types that check every
argument while it is parsed, before anything is loaded, and the GIM settings' options, built from
``gim_fast.settings`` (a new setting needs no change here)."""
from __future__ import annotations

import argparse
import math

from .settings import BACKENDS, GIMSettings, cli_options

PROG = "gim-fast"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def make_parser(container=None, name: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A parser (``container=None``) or a subcommand's parser (``container``: what ``add_subparsers`` returned),
    with argparse's prefix matching turned off: an option is taken only as spelled in full (``--shard`` is never
    read as ``--shard-rows``)."""
    kwargs.setdefault("allow_abbrev", False)
    if container is None:
        return argparse.ArgumentParser(**kwargs)
    return container.add_parser(name, **kwargs)


class _ListAction(argparse.Action):
    """Collects the values of a list option: each command-line word may itself hold several values separated by
    commas, so ``--methods gim eap``, ``--methods gim,eap`` and ``--methods gim, eap`` are the same list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for value in values for item in value])


def add_list_argument(parser, flag: str, *, item=str, choices=None, allow_empty: bool = False, **kwargs):
    """A list option, the one convention of every subcommand: values separated by spaces, by commas, or both.
    ``item`` parses one value (an argparse type); ``choices`` restricts the values (a clear error names them);
    ``allow_empty``: the option may be given with no value (``nargs='*'``)."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        values = []
        for part in parts:
            if not part:
                continue
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(choices)}")
            values.append(item(part))
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected a value, got {text!r}")
        return values
    parse.__name__ = getattr(item, "__name__", "value")
    return parser.add_argument(flag, nargs="*" if allow_empty else "+", type=parse, action=_ListAction, **kwargs)


def _float(text: str, accepted: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None


def positive_number(*, finite: bool):
    """argparse type: a float > 0 (and, with ``finite``, not infinite)."""
    accepted = f"a {'finite ' if finite else ''}number > 0"

    def parse(text: str) -> float:
        value = _float(text, "a number")
        if not value > 0 or (finite and value == math.inf):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value
    parse.__name__ = "number > 0"
    return parse


def optional_number(minimum: float, *, strict: bool):
    """argparse type: 'none' (or 'off') → None, else a finite float > minimum (strict) or >= minimum."""
    relation = ">" if strict else ">="

    def parse(text: str):
        if text.strip().lower() in ("none", "off"):
            return None
        value = _float(text, "a number or 'none'")
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"expected a finite number {relation} {minimum:g} or 'none', "
                                             f"got {text!r}")
        return value
    parse.__name__ = "number or none"
    return parse


def positive_int(minimum: int = 1):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


# the order the settings' options are listed in --help: the numbers first, then the switches and the backend
_KIND_ORDER = {"temperature": 0, "scale": 0, "switch": 1, "choice": 2}
_UNSET = object()


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """One option per GIM setting, each with the library's default; 'none' turns a modification off."""
    group = parser.add_argument_group("GIM settings ('none' turns a modification off)")
    for option in sorted(cli_options(), key=lambda o: _KIND_ORDER[o.kind]):
        if option.kind == "switch":
            group.add_argument(option.flag, dest=option.name, action="store_false", help=option.help)
        elif option.kind == "choice":
            group.add_argument(option.flag, dest=option.name, choices=BACKENDS, default=option.default,
                               help=f"{option.help} (default {option.default})")
        else:
            strict, metavar = (True, "T|none") if option.kind == "temperature" else (False, "X|none")
            group.add_argument(option.flag, dest=option.name, type=optional_number(0.0, strict=strict),
                               default=_UNSET, metavar=metavar, help=f"{option.help} (default {option.default})")


def settings_from_args(args: argparse.Namespace) -> GIMSettings:
    """The GIM settings the options of :func:`add_settings_args` gave (the library's default where none was)."""
    given = {o.name: getattr(args, o.name) for o in cli_options() if getattr(args, o.name) is not _UNSET}
    try:
        return GIMSettings(**given)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


__all__ = ["PROG", "BACKENDS", "DTYPES", "UsageError", "make_parser", "add_list_argument", "positive_number",
           "optional_number", "positive_int", "add_settings_args", "settings_from_args"]
