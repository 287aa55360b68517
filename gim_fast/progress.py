"""Progress of long work on standard error: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself with carriage returns and escape codes, which fill a log file (or a CI log) with kilobytes of
control characters; when standard error is not a terminal, progress is a plain line instead, at the start, at most
every ``interval`` seconds, and at the end:

    gim-fast circuit: scoring: gim: 16/32 (50%), 12 s
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:        # a closed stream
        return False


class Progress:
    """``total`` steps of ``desc``: ``update(n)`` after n more are done, ``close()`` at the end (also a context
    manager). ``enabled=False`` shows nothing; ``bar``: a tqdm bar (default: when ``stream`` is a terminal), else
    plain lines prefixed by ``prefix``, the first at once, then at most every ``interval`` seconds, and one when
    all ``total`` steps are done."""

    def __init__(self, total: int, desc: str, *, prefix: str = "gim-fast", enabled: bool = True, stream=None,
                 bar: bool | None = None, interval: float = 30.0):
        self.total, self.desc, self.prefix, self.enabled = int(total), desc, prefix, enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.done = interval, 0
        self.started = self._last = time.monotonic()
        self._bar = None
        if not enabled:
            return
        if bar is None:
            bar = is_terminal(self.stream)
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, leave=False)
        else:
            self._line()

    def _line(self) -> None:
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        print(f"{self.prefix}: {self.desc}: {self.done}/{self.total}{share}, "
              f"{time.monotonic() - self.started:.0f} s", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        finished = self.done >= self.total and self.done - n < self.total      # the step that completes it
        if finished or now - self._last >= self.interval:
            self._last = now
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
