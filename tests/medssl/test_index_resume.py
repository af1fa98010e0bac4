"""`medssl index` on large trees: worker processes, part files, and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from medssl import index as index_module
from medssl.cli.main import cli
from medssl.errors import MedsslError
from medssl.index import CHUNK, index_tree, read_index
from medssl.synth.scale import write_header_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    """1,300 tiny CT files: 13 series of 100 in 5 studies, 6 chunks of the index."""
    root = write_header_files(tmp_path_factory.mktemp("big") / "tree", 1300, files_per_series=100)
    (root / "notes.txt").write_text("not dicom")
    return root


def test_an_index_through_part_files_equals_one_in_memory(big_tree, tmp_path):
    plain = index_tree(big_tree, workers=1)
    assert len(plain.series) == 13 and plain.n_files == 1300 and len(plain.unreadable) == 1
    parted = index_tree(big_tree, workers=2, parts=tmp_path / "parts")
    assert parted == plain
    assert len(list((tmp_path / "parts").glob("part-*.parquet"))) == -(-1301 // CHUNK)


def test_an_interrupted_index_resumes_reading_only_the_chunks_left(big_tree, tmp_path, monkeypatch):
    real = index_module._index_chunk
    calls: list[int] = []

    def failing(paths, root, part):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped after three chunks
        calls.append(len(paths))
        return real(paths, root, part)

    monkeypatch.setattr(index_module, "_index_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        index_tree(big_tree, workers=1, parts=tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("part-*.parquet"))) == 3
    monkeypatch.setattr(index_module, "_index_chunk", real)
    seen: list[int] = []
    resumed_calls: list[int] = []

    def counting(paths, root, part):
        resumed_calls.append(len(paths))
        return real(paths, root, part)

    monkeypatch.setattr(index_module, "_index_chunk", counting)
    resumed = index_tree(big_tree, workers=1, parts=tmp_path / "parts", progress=seen.append)
    assert len(resumed_calls) == -(-1301 // CHUNK) - 3  # only the chunks without a part file
    assert seen[0] == 3 * CHUNK  # progress starts at what the first run did
    assert resumed == index_tree(big_tree, workers=1)


def test_parts_of_another_tree_are_refused(big_tree, tmp_path):
    index_tree(big_tree, workers=1, parts=tmp_path / "parts")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(MedsslError, match="partial index of another tree"):
        index_tree(other, parts=tmp_path / "parts")


def test_medssl_index_killed_mid_run_resumes_to_the_same_table(tmp_path):
    root = write_header_files(tmp_path / "tree", 12 * CHUNK, files_per_series=128)
    out = tmp_path / "index.parquet"
    parts = tmp_path / "index.parquet.parts"
    command = [
        str(Path(sys.prefix) / "bin" / "medssl"),
        "index",
        str(root),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while (
        not list(parts.glob("part-*.parquet"))
        and time.monotonic() < deadline
        and process.poll() is None
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(parts.glob("part-*.parquet")))
    assert 1 <= done < 12 and not out.exists()  # killed in the middle
    assert not list(parts.glob(".*.tmp"))  # no torn part file is left behind as a part
    result = CliRunner().invoke(cli, ["index", str(root), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "24 series, 3072 files" in result.output
    assert not parts.exists()  # the parts go once the table is written
    assert read_index(out).series == index_tree(root, workers=1).series
