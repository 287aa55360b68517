"""The command line run in this process, for tests of what ``gim-fast`` prints and returns."""
from __future__ import annotations

import contextlib
import io

from gim_fast.cli import main


def run_main(argv, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``gim-fast ARGV`` in this process, argparse's own exits included; ``stdin``:
    the text standard input holds for the call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if stdin is not None:
            stack.enter_context(_stdin(stdin))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(out))
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def refused(argv, *messages) -> str:
    """Asserts that ``gim-fast ARGV`` exits with 2 and no traceback, its standard error naming every one of
    ``messages``; returns that standard error."""
    code, _, err = run_main(argv)
    assert code == 2, (argv, err)
    assert "Traceback" not in err and all(m in err for m in messages), (argv, messages, err)
    return err
