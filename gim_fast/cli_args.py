"""What the command lines share (``gim-fast explain|attribute`` in ``gim_fast.cli``, ``gim-fast evaluate`` in
``gim_fast.evaluate.cli``, and any later subcommand): the usage error and the argparse types that check every
argument while it is parsed, before anything is loaded."""
from __future__ import annotations

import argparse
import math

PROG = "gim-fast"
BACKENDS = ("auto", "eager", "torch", "triton")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


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


__all__ = ["PROG", "BACKENDS", "DTYPES", "UsageError", "positive_number", "optional_number", "positive_int"]
