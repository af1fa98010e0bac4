"""Training runs of the long benchmarks that outlive one sitting: whether a run folder can be
resumed, and a resumed run's training time (``focalmix_ssl.py``, and ``seg_methods.py`` /
``ad_settings.py`` through :mod:`medssl.bench.seg_bench`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

__all__ = ["PAUSE_S", "resumable", "train_wall_s"]

#: A gap between two ``log.jsonl`` lines longer than this, in s, is a pause (the run was
#: interrupted and resumed later), not training: a validation round takes 1-3 minutes.
PAUSE_S = 600.0


def resumable(cfg: Any, out: Path) -> bool:
    """Whether ``out`` holds an interrupted (or finished) run of exactly ``cfg``: its
    ``checkpoints/last.pt`` exists and its ``config.yaml`` reads back as ``cfg`` (compared as
    configs, so a field added since, at its default, does not count as a change). Such a run
    continues from its last checkpoint (a finished one only re-runs its test); a folder of another
    experiment (another budget, say) is trained afresh, as resuming it would mix two
    learning-rate schedules."""
    from medssl.config import ConfigError, load_config

    if not (out / "checkpoints" / "last.pt").is_file() or not (out / "config.yaml").is_file():
        return False
    try:
        return load_config(type(cfg), out / "config.yaml") == cfg
    except ConfigError:  # written by another version of the config classes
        return False


def train_wall_s(run_dir: Path, pause_s: float = PAUSE_S, before: float | None = None) -> float:
    """Training wall time in s from the timestamps of ``run_dir/log.jsonl``: validation rounds
    included, the pauses of an interrupted and resumed run (gaps over ``pause_s``) left out;
    with ``before`` (a Unix time), only the lines logged before it (what earlier sittings did).

    A run's process wall time misses the part done before an interruption; this counts every
    segment.
    """
    times = [json.loads(line)["time"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    if before is not None:
        times = [t for t in times if t < before]
    return float(sum(d for a, b in itertools.pairwise(times) if 0 <= (d := b - a) <= pause_s))
