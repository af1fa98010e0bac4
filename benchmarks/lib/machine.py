"""What the benchmarks ran on, for their reports (imported by the scripts in this folder)."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TreeMemory", "alternate", "cpu_device", "write_report"]


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


def alternate(runs: dict[str, Any], repeats: int, verbose: bool = False) -> dict[str, list[float]]:
    """Wall seconds of each of ``runs`` (name -> callable), the runs alternated ``repeats`` times
    so that a change in the machine's load hits every one of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if verbose:
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    return times


def write_report(out: Path, report: dict[str, Any], text: str) -> None:
    """``OUT.json`` (the report) and ``OUT.md`` (its table), then the table on stdout."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and its descendants every ``period_s``; ``peak_mb`` is
    the largest sum, ``samples`` every ``(seconds since start, kB)``."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.peak_kb = 0
        self.max_processes = 0
        self.load: list[float] = []
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        ticks = 0
        start = time.perf_counter()
        while not self._stop_event.is_set():
            tree, stack, total, count = _children(), [self.pid], 0, 0
            while stack:
                pid = stack.pop()
                total += _rss_kb(pid)
                count += 1
                stack.extend(tree.get(pid, []))
            self.peak_kb = max(self.peak_kb, total)
            self.samples.append((time.perf_counter() - start, total))
            self.max_processes = max(self.max_processes, count)
            if ticks % 50 == 0:
                self.load.append(os.getloadavg()[0])
            ticks += 1
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024
