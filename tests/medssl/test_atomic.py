"""The one atomic-write helper (medssl.atomic): all or nothing, strict, and the spool's variant."""

from __future__ import annotations

import os

import pytest

from medssl.atomic import atomic_write, fsync_dir, make_dirs


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")

    def half(fh):
        fh.write(b"new, but")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "table.parquet"
    ]


def test_a_write_replaces_the_file_whole_creating_its_folders_readable_by_others(tmp_path):
    target = tmp_path / "a" / "b" / "config.yaml"
    atomic_write(target, lambda fh: fh.write("key: välue\n"), "w")
    assert target.read_text(encoding="utf-8") == "key: välue\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_the_temp_file_can_live_in_a_sweepable_folder(tmp_path):
    sweep = tmp_path / "tmp"
    sweep.mkdir()
    seen = []

    def write(fh):
        seen.extend(p.name for p in sweep.iterdir())
        fh.write(b"x")

    atomic_write(tmp_path / "study" / "1.dcm", write, tmp_dir=sweep, suffix=".part")
    assert len(seen) == 1 and seen[0].endswith(".part")  # while writing: in tmp/, found by *.part
    assert list(sweep.iterdir()) == [] and (tmp_path / "study" / "1.dcm").read_bytes() == b"x"


def test_it_is_strict(tmp_path):
    with pytest.raises(OSError):
        fsync_dir(tmp_path / "missing")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        atomic_write(blocker / "under-a-file.bin", lambda fh: fh.write(b"x"))
    make_dirs(tmp_path / "x" / "y")
    assert (tmp_path / "x" / "y").is_dir()
    assert os.access(tmp_path / "x" / "y", os.W_OK)
