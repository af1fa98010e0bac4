"""The gateway's spool: received instances, quarantined input and job outputs on one filesystem.

Layout under ``root``::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   stored instances
    tmp/.<name>.<random>.part                                              writes in progress
    quarantine/<UTC yyyymmddTHHMMSS>-<uuid>.dcm + .json                    refused input + reason
    outputs/<job_id>/                                                      results of one job

A stored or quarantined file is durable when its method returns: the bytes are written to
``tmp/``, flushed and fsynced, renamed into place with :func:`os.replace` (atomic on one
filesystem), and the directories that changed are fsynced too. A killed process therefore
leaves either the complete file or a ``tmp/*.part`` leftover, which :meth:`Spool.recover`
deletes at the next start; never a half-written instance under ``incoming/``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from medssl.atomic import atomic_write, fsync_dir, make_dirs
from medssl.errors import MedsslError

__all__ = ["QuarantineEntry", "Spool", "SpoolError", "SpoolFullError", "StoredInstance"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_CHARS = 64


class SpoolError(MedsslError):
    """The spool cannot take an instance (a malformed UID, a failed write)."""


class SpoolFullError(SpoolError):
    """Storing would bring the spool's filesystem below its free-space floor."""


@dataclass(frozen=True)
class StoredInstance:
    """One instance durably stored in the spool.

    Attributes:
        study_uid / series_uid / sop_instance_uid: its UIDs (also its path under ``incoming/``).
        sop_class_uid: the SOP class it was received as.
        path: the stored file (DICOM Part 10, in the transfer syntax it was received in).
        n_bytes: size of ``path`` in bytes.
        received_at: when it was stored, seconds since the epoch (:func:`time.time`).
        calling_ae: the AE title of the sender (stripped).
        accession_number: the instance's AccessionNumber ("" when absent), for the job store
            and the operators; never logged.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    n_bytes: int
    received_at: float
    calling_ae: str
    accession_number: str = ""


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined input (see :meth:`Spool.quarantine`).

    Attributes:
        name: the file's stem (``<UTC yyyymmddTHHMMSS>-<uuid>``).
        time: when it was stored (the file's mtime, epoch s).
        n_bytes: size of the refused bytes.
        reason: why it was refused.
        context: the note's other fields (calling AE, peer, UIDs; never PHI).
    """

    name: str
    time: float
    n_bytes: int
    reason: str
    context: dict[str, str]


def _check_uid(uid: str, what: str) -> str:
    if not isinstance(uid, str) or len(uid) > _UID_MAX_CHARS or not _UID.match(uid):
        size = f"{len(uid)} characters" if isinstance(uid, str) else f"a {type(uid).__name__}"
        raise SpoolError(  # the value is not quoted: a damaged header may hold anything (PHI)
            f"{what} ({size}, not quoted) is not a DICOM UID (digits and dots, "
            f"at most {_UID_MAX_CHARS} characters); it cannot name a spool path"
        )
    return uid


def _tree_bytes(path: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:  # removed while walking (a cleanup running beside us)
            continue
    return total


class Spool:
    """Durable storage of received instances (see the module docstring for the layout).

    Every method may be called from several threads at once (one per association).
    The folders are the attributes ``root``, ``incoming``, ``tmp``, ``quarantine_dir``
    (``quarantine`` is the method that fills it) and ``outputs``.

    Args:
        root: the spool directory; it and its four sub-folders are created if missing.
        min_free_bytes: free-space floor of ``root``'s filesystem, in bytes: a write that
            would leave less free space is refused with :class:`SpoolFullError`.

    Raises:
        ValueError: ``min_free_bytes`` is negative.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self.incoming = self.root / "incoming"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.outputs = self.root / "outputs"
        for folder in (self.incoming, self.tmp, self.quarantine_dir, self.outputs):
            make_dirs(folder)

    def store(self, data: bytes, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Store one instance durably at ``incoming/<study>/<series>/<sop>.dcm``.

        An existing file of the same SOP Instance UID (a re-sent instance) is replaced.

        Args:
            data: the DICOM Part 10 bytes (preamble, file meta, dataset), stored as given.
            study_uid / series_uid / sop_instance_uid: the instance's UIDs; they become path
                parts, so each must match ``^[0-9]+(\\.[0-9]+)*$`` and be at most 64 characters.

        Returns:
            The stored file's path.

        Raises:
            SpoolError: a UID is malformed (the message names it).
            SpoolFullError: the write would leave less than ``min_free_bytes`` free, or the
                filesystem ran out of space; nothing is left behind.
            OSError: any other failed write; nothing is left behind.
        """
        _check_uid(study_uid, "StudyInstanceUID")
        _check_uid(series_uid, "SeriesInstanceUID")
        _check_uid(sop_instance_uid, "SOPInstanceUID")
        target = self.incoming / study_uid / series_uid / f"{sop_instance_uid}.dcm"
        self._write_durably(data, target)
        return target

    def quarantine(self, data: bytes, reason: str, **context: str) -> Path:
        """Keep refused input for a human: ``quarantine/<UTC yyyymmddTHHMMSS>-<uuid>.dcm``.

        A ``.json`` of the same name holds ``{"reason", "time" (ISO 8601 UTC), **context}``.
        Both files are durable when this returns.

        Args:
            data: the bytes as received (they may not be DICOM at all).
            reason: why they were refused, in words.
            context: more string fields for the ``.json`` (calling AE, peer, UIDs; never PHI).

        Returns:
            The ``.dcm`` path.

        Raises:
            ValueError: ``context`` has a key named ``time``.
            SpoolFullError: the files would leave less than ``min_free_bytes`` free.
            OSError: a failed write.
        """
        if "time" in context:
            raise ValueError("quarantine context cannot have a key named 'time' (it is set here)")
        now = datetime.now(timezone.utc)
        stem = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}"
        target = self.quarantine_dir / f"{stem}.dcm"
        note = {"reason": reason, "time": now.isoformat(timespec="seconds"), **context}
        self._write_durably(data, target)
        self._write_durably(json.dumps(note, indent=2).encode(), target.with_suffix(".json"))
        return target

    def quarantined(self) -> list[QuarantineEntry]:
        """The quarantined files, newest first, each with its note (a missing or unreadable
        ``.json`` gives the reason "no note")."""
        entries = []
        for path in self.quarantine_dir.glob("*.dcm"):
            try:
                note = json.loads(path.with_suffix(".json").read_text())
                if not isinstance(note, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError):
                note = {"reason": "no note"}
            try:
                stat = path.stat()
            except FileNotFoundError:  # purged meanwhile
                continue
            entries.append(
                QuarantineEntry(
                    name=path.stem,
                    time=stat.st_mtime,
                    n_bytes=stat.st_size,
                    reason=str(note.get("reason", "")),
                    context={
                        str(k): str(v) for k, v in note.items() if k not in ("reason", "time")
                    },
                )
            )
        return sorted(entries, key=lambda e: (e.time, e.name), reverse=True)

    def purge_quarantine(self, before: float) -> int:
        """Delete quarantined files (and their notes) stored before ``before`` (epoch s);
        returns how many entries were removed."""
        removed = 0
        for path in list(self.quarantine_dir.glob("*.dcm")):
            try:
                if path.stat().st_mtime >= before:
                    continue
            except FileNotFoundError:
                continue
            path.with_suffix(".json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            fsync_dir(self.quarantine_dir)
        return removed

    def study_dir(self, study_uid: str) -> Path:
        """``incoming/<study_uid>`` (not created).

        Raises:
            SpoolError: ``study_uid`` is malformed.
        """
        return self.incoming / _check_uid(study_uid, "StudyInstanceUID")

    def study_files(self, study_uid: str) -> list[Path]:
        """The stored ``.dcm`` files of a study, sorted by path; empty if none."""
        return sorted(self.study_dir(study_uid).glob("*/*.dcm"))

    def output_dir(self, job_id: int) -> Path:
        """``outputs/<job_id>``, created if missing.

        Raises:
            ValueError: ``job_id`` is not a non-negative integer.
        """
        folder = self._output_path(job_id)
        make_dirs(folder)
        return folder

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's stored instances (nothing happens if there are none)."""
        folder = self.study_dir(study_uid)
        if folder.exists():
            shutil.rmtree(folder)

    def remove_outputs(self, job_id: int) -> None:
        """Delete a job's outputs (nothing happens if there are none)."""
        folder = self._output_path(job_id)
        if folder.exists():
            shutil.rmtree(folder)

    def free_bytes(self) -> int:
        """Free bytes on ``root``'s filesystem for this (unprivileged) process."""
        return int(shutil.disk_usage(self.root).free)

    def below_floor(self) -> str | None:
        """Why the spool cannot take instances now, or None when it can.

        Returns:
            A reason naming the free space and the floor, in MiB, while ``root``'s filesystem
            has less than ``min_free_bytes`` free (every store would be refused); else None.
        """
        free = self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return (
            f"spool {self.root}: {free / 2**20:.0f} MiB free, below its floor of "
            f"{self.min_free_bytes / 2**20:.0f} MiB (spool.min_free_mb); instances are refused"
        )

    def usage_bytes(self) -> int:
        """Bytes held under ``root`` (the sum of file sizes, not counting directories)."""
        return _tree_bytes(self.root)

    def recover(self) -> list[str]:
        """Clean up after a killed process; call once at start, before receiving.

        Deletes the ``tmp/*.part`` leftovers of writes that never completed.

        Returns:
            The Study Instance UIDs found under ``incoming/`` (sorted): studies received
            before the restart, for the caller to resume.
        """
        for leftover in self.tmp.glob("*.part"):
            leftover.unlink(missing_ok=True)
        fsync_dir(self.tmp)
        return sorted(p.name for p in self.incoming.iterdir() if p.is_dir() and _UID.match(p.name))

    def _output_path(self, job_id: int) -> Path:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 0:
            raise ValueError(f"job_id must be a non-negative integer, got {job_id!r}")
        return self.outputs / str(job_id)

    def _write_durably(self, data: bytes, target: Path) -> None:
        """Write ``data`` to ``tmp/``, fsync, rename onto ``target``, fsync the directories."""
        free = self.free_bytes()
        if free - len(data) < self.min_free_bytes:
            raise SpoolFullError(
                f"spool {self.root}: {free} bytes free; writing {len(data)} bytes would go below "
                f"the floor of {self.min_free_bytes} bytes (spool.min_free_mb)"
            )
        try:
            atomic_write(
                target, lambda handle: handle.write(data), tmp_dir=self.tmp, suffix=".part"
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SpoolFullError(
                    f"spool {self.root}: no space left on the device writing {target.name}"
                ) from exc
            raise
