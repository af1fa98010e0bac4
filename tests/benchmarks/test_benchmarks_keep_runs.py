"""benchmarks/keep_runs.sh: finished runs are committed as they land, and nothing else is."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.paths import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def test_a_finished_run_is_committed_alone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results" / "seg_methods_runs").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "keep_runs.sh", repo / "benchmarks")
    (repo / "notes.txt").write_text("draft\n")
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "start")
    (repo / "notes.txt").write_text("edited and staged, not a result\n")
    _git(repo, "add", "notes.txt")
    watcher = subprocess.Popen(["bash", str(repo / "benchmarks" / "keep_runs.sh"), "1"])
    try:
        (repo / "benchmarks" / "results" / "seg_methods_runs" / "organs20-ad-0.json").write_text(
            "{}\n"
        )
        (repo / "benchmarks" / "results" / "seg_methods.md").write_text("# table\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _git(repo, "rev-list", "--count", "HEAD") == "1\n":
            time.sleep(0.5)
    finally:
        watcher.terminate()
        watcher.wait()
    assert (
        _git(repo, "log", "-1", "--format=%s") == "Long benchmarks: runs finished (organs20-ad-0)\n"
    )
    assert sorted(_git(repo, "show", "--name-only", "--format=", "HEAD").split()) == [
        "benchmarks/results/seg_methods.md",
        "benchmarks/results/seg_methods_runs/organs20-ad-0.json",
    ]
    assert _git(repo, "diff", "--cached", "--name-only") == "notes.txt\n"  # still staged, not taken
