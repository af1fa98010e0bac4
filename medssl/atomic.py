"""Crash-safe file writes, the one implementation: a temp file, fsync, rename, fsync the folder.

A reader (or a process restarted after ``kill -9``) sees either the old file or the whole
new one, never a torn write; once :func:`atomic_write` returns, the file and its directory
entry are on disk. Strict: a failed write, fsync or rename raises (after removing the temp
file), nothing is swallowed. Used by the training cache, checkpoints, configs, result
tables and DICOM outputs, and by the gateway's spool (with its own temp folder, so that a
restart can sweep what a crash left there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "fsync_dir", "make_dirs"]


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk.

    Raises:
        OSError: the folder cannot be opened or synced.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent that gained an entry
    (a crash cannot lose a folder a durable file was renamed into)."""
    missing: list[Path] = []
    probe = Path(path)
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another thread may create it at the same time
        fsync_dir(folder.parent)


def atomic_write(
    path: Path,
    write: Callable[[Any], object],
    mode: str = "wb",
    *,
    tmp_dir: Path | None = None,
    suffix: str = ".tmp",
) -> None:
    """Call ``write(fh)`` on a temp file, fsync it, rename it onto ``path``, fsync the folder.

    Args:
        path: the file to (re)place; its missing folders are created durably.
        write: writes the content to the open temp file.
        mode: ``"wb"`` or ``"w"`` (text is UTF-8).
        tmp_dir: where the temp file lives (default: ``path``'s folder); it must be on the
            same filesystem as ``path`` (the rename is atomic only there).
        suffix: the temp file's suffix (a sweeper can find leftovers by it).

    The file is readable by others (0644).

    Raises:
        OSError: any failed step; the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; others may read the run, cache or spool
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
