"""What the benchmarks ran on, for their reports (imported by the scripts in this folder)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_device", "write_report"]


def cpu_device() -> str:
    """``"CPU: <model name>, <n> logical cores, no GPU"`` (the model from /proc/cpuinfo)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} logical cores, no GPU"


def write_report(out: Path, report: dict[str, Any], text: str) -> None:
    """``OUT.json`` (the report) and ``OUT.md`` (its table), then the table on stdout."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
