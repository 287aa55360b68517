"""Checks that a run can write where it was told to, made before anything is loaded or computed: a folder that
cannot be created, or a parent that is a file, is reported at once in one line instead of after the work. And
``run_environment``: the machine and versions a written result was computed with.

Writability is probed by creating (and removing) a hidden temporary folder, not with ``os.access``: a process
running as root passes every permission check of ``os.access`` and still cannot write on a read-only file system.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OutputError", "check_output_dir", "check_empty_output_dir", "check_output_file", "run_environment"]


class OutputError(ValueError):
    """An output path that cannot be written (reported in one line; the command lines exit with code 2)."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe(folder: Path, what: str) -> None:
    try:
        with tempfile.TemporaryDirectory(prefix=".gim-fast-probe-", dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {os.fspath(folder)!r} ({e.strerror or e})") from None


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` is, or can be created as, a folder this process can write in; otherwise :class:`OutputError`.
    Nothing is left behind (a folder that does not exist yet is not created)."""
    path = Path(path).expanduser()
    what = f"{option} {os.fspath(path)}"
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        if existing == path.absolute():
            raise OutputError(f"{what}: exists and is not a directory; give a directory (it is created if "
                              "missing)")
        raise OutputError(f"{what}: cannot create it, {os.fspath(existing)!r} is a file, not a directory")
    _probe(existing, what)
    return path


def check_empty_output_dir(path: str | os.PathLike, option: str = "--out", *, overwrite: str = "--overwrite") -> Path:
    """``path`` does not exist yet or is an empty folder; otherwise :class:`OutputError` naming a few of the files
    it holds and the option (``overwrite``) that writes there anyway. A run that writes a fixed set of result
    files refuses a folder with earlier results, so that it never replaces them by accident."""
    path = Path(path).expanduser()
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
            raise OutputError(f"{option} {os.fspath(path)}: the folder is not empty ({shown}); give a new or empty "
                              f"folder, or {overwrite} to replace the files of the same names")
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` can be written as a file: it is not a directory and its folder exists and is writable."""
    path = Path(path).expanduser()
    what = f"{option} {os.fspath(path)}"
    if path.is_dir():
        raise OutputError(f"{what}: is a directory; give a file name")
    folder = path.absolute().parent
    if not folder.is_dir():
        existing = _nearest_existing(folder)
        reason = "is a file, not a directory" if existing == folder else "does not exist"
        raise OutputError(f"{what}: its folder {os.fspath(folder)!r} {reason}")
    _probe(folder, what)
    return path


def run_environment() -> dict:
    """The machine and versions a result is computed with (device, torch, transformers, UTC date), as the result
    files of ``gim-fast evaluate`` and ``gim-fast circuit`` record them."""
    import datetime as dt
    import platform

    import torch          # imported when a result is written, not when the command line starts
    import transformers

    return {"device": f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
