"""Synthetic data generation speed: how long one case of each phantom takes.

Cases (a list: add a phantom by appending a :class:`Case`):

1. ``chest 128^3``: ``generate_chest_ct`` with ``ChestConfig(matrix=128, n_slices=128)``
   (a targeted reconstruction, ~100 mm field of view). Target: < 0.6 s.
2. ``chest 512x512x200``: ``ChestConfig(matrix=512, n_slices=200)``, a full field of
   view. Target: a few seconds.
3. ``chest 512x512 default``: ``ChestConfig()``, the slice count covering the lungs at
   the drawn slice thickness (the shape varies by seed).
4. ``organs A 128^3``, ``organs mr 128^3``: ``generate_organ_phantom`` on a 128^3 grid
   in CT domain ``A`` and the MR domain (Rician noise). Target: < 0.6 s.
5. ``organs A default``: domain ``A``'s own grid, (64, 128, 128), as CPU training uses it.

Each case runs once to warm up, then on ``--repeats`` seeds; the median, min and max
wall times are reported (the machines are shared and noisy). Prints a table and
writes ``benchmarks/results/synth_speed.json``.

    python benchmarks/synth_speed.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organs import generate_organ_phantom

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Case:
    """One thing to time: ``make(seed)`` builds a case and returns its array shape."""

    name: str
    make: Callable[[int], tuple[int, ...]]
    target_s: float | None = None


def _chest(config: ChestConfig) -> Callable[[int], tuple[int, ...]]:
    return lambda seed: tuple(generate_chest_ct(seed, config).volume.shape)


def _organs(domain: str, shape: tuple[int, int, int] | None) -> Callable[[int], tuple[int, ...]]:
    return lambda seed: tuple(generate_organ_phantom(seed, domain, shape=shape).image.shape)


CASES = [
    Case("chest 128^3", _chest(ChestConfig(matrix=128, n_slices=128)), target_s=0.6),
    Case("chest 512x512x200", _chest(ChestConfig(matrix=512, n_slices=200)), target_s=5.0),
    Case("chest 512x512 default", _chest(ChestConfig())),
    Case("organs A 128^3", _organs("A", (128, 128, 128)), target_s=0.6),
    Case("organs mr 128^3", _organs("mr", (128, 128, 128)), target_s=0.6),
    Case("organs A default", _organs("A", None)),
]


def run_case(case: Case, repeats: int) -> dict[str, object]:
    """Time ``case`` on seeds ``0 .. repeats - 1`` after one warm-up run."""
    case.make(repeats)
    seconds, shapes = [], []
    for seed in range(repeats):
        start = time.perf_counter()
        shapes.append(list(case.make(seed)))
        seconds.append(time.perf_counter() - start)
    return {
        "name": case.name,
        "shapes": shapes,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "target_s": case.target_s,
        "all_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [run_case(case, args.repeats) for case in CASES]
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'target s':>9}  shape (seed 0)")
    for row in rows:
        target = f"{row['target_s']:.1f}" if row["target_s"] is not None else "-"
        print(
            f"{row['name']:<24} {row['median_s']:>9.2f} {row['min_s']:>7.2f} "
            f"{row['max_s']:>7.2f} {target:>9}  {row['shapes'][0]}"
        )
    print(f"wrote {args.out / 'synth_speed.json'}")


if __name__ == "__main__":
    main()
