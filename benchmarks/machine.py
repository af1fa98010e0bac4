"""What the benchmarks ran on, for their reports (imported by the scripts in this folder)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_device"]


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
