"""How the shipped organ segmenter does on phantom families it was not trained on.

The shipped ``abdomen-organs`` is trained on CT vendor A (realistic contrast, with between-case
variation) and on the domain-randomised family (``--domain rand``). This scores it, through the
same pipeline and exported ONNX model ``medssl-score`` runs, on test subjects it has never seen
(seeds ``--seed`` on, apart from the build's 7000-7135) of:

* ``A``: its own CT-realistic family (other subjects);
* ``B``, ``C``, ``D``: three other CT "vendors", held out of training: other contrast phases and
  calibrations, noise, kernels, bias, slice thicknesses (2.5-5 mm) and fields of view
  (``medssl.synth.domains.DOMAINS``).

Each ``--variant REPO:NAME`` (e.g. a twin trained on domain A alone, without randomisation:
``OEXTRA="--set data.domains=[A]" OWORK=build/organs-no-rand REPO=build/organs-no-rand/repository
benchmarks/build_default_models.sh organs``) is scored on the same cases, and its per-case Dice
is compared with the shipped model's by a paired bootstrap over cases.

Metrics (``medssl.metrics.segmentation``, on the source grid): Dice per organ per case, the
mean over organs per case, then the mean over cases with a 95 % bootstrap interval over cases.

    .venv/bin/python benchmarks/organ_quality.py [--families A B C D] [--cases 8] \\
        [--variant build/organs-no-rand/repository:abdomen-organs] \\
        [--out benchmarks/results/organ_quality]

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medssl.bench.machine import cpu_device, write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
N_BOOTSTRAP = 2000


def score_family(repository: Path, name: str, data: Path) -> dict[str, Any]:
    """Per-case Dice (mean over organs, and per organ) of one model on one family's test cases,
    and the seconds per case."""
    from medssl.datasets.decathlon import Decathlon
    from medssl.metrics.segmentation import segmentation_metrics
    from medssl.pipeline.segment import segment
    from medssl.runners import open_runner

    runner = open_runner(repository, name)
    card = runner.card
    params = card.segmentation_params(batch_size=4)
    dataset = Decathlon(data)
    names = {label.value: label.name for label in card.labels}
    cases, seconds = {}, []
    for case in dataset.test:
        image, truth = dataset.image(case), dataset.label(case)
        start = time.perf_counter()
        result = segment(image, runner, params)
        seconds.append(time.perf_counter() - start)
        metrics = segmentation_metrics(
            np.asarray(result.labels.array),
            np.asarray(truth.array, dtype=np.int64),
            sorted(names),
            image.spacing,
        )
        per_organ = {names[k]: float(m.dice) for k, m in metrics.items()}
        cases[case.case_id] = {
            "dice": float(np.mean(list(per_organ.values()))),
            "organs": per_organ,
        }
    return {"cases": cases, "s_per_case_median": float(np.median(seconds))}


def bootstrap_mean(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile bootstrap interval over cases."""
    from medssl.metrics.froc import order_statistic_interval

    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(N_BOOTSTRAP, len(values)))].mean(axis=1)
    lo, hi = order_statistic_interval(draws, 0.95)
    return float(values.mean()), float(lo), float(hi)


def render(report: dict[str, Any]) -> str:
    models = list(report["models"])
    lines = [
        "# The shipped organ segmenter on phantom families it was not trained on",
        "",
        f"{report['device']}; {report['cases']} test subjects per family (seeds "
        f"from {report['seed']}, none used in training); Dice on the source grid "
        "through the exported ONNX model (`medssl-score`'s pipeline): mean over "
        "the 11 organs per case, then over cases [95 % bootstrap CI over cases].",
        "",
        "| family | trained on it | "
        + " | ".join(f"{m} Dice %" for m in models)
        + (" | Δ vs shipped, paired [95 % CI]" if len(models) > 1 else "")
        + " | s/case |",
        "|---|---|" + "---:|" * len(models) + ("---:|" if len(models) > 1 else "") + "---:|",
    ]
    for family in report["families"]:
        cells = []
        for m in models:
            mean, lo, hi = report["models"][m][family]["summary"]
            cells.append(f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        row = (
            f"| {family} | {'yes' if family in report['trained_on'] else 'no (held out)'} | "
            + " | ".join(cells)
        )
        if len(models) > 1:
            d = report["models"][models[1]][family].get("delta")
            row += f" | {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if d else " | —"
        lines.append(row + f" | {report['models'][models[0]][family]['s_per_case_median']:.1f} |")
    shipped = report["models"][models[0]]
    organs = list(next(iter(next(iter(shipped.values()))["cases"].values()))["organs"])
    lines += [
        "",
        f"Dice % per organ of `{models[0]}` (mean over cases):",
        "",
        "| family | " + " | ".join(organs) + " |",
        "|---|" + "---:|" * len(organs),
    ]
    for family in report["families"]:
        cases = shipped[family]["cases"].values()
        lines.append(
            f"| {family} | "
            + " | ".join(f"{100 * np.mean([c['organs'][o] for c in cases]):.1f}" for o in organs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="abdomen-organs")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="REPO:NAME",
        help="another model to score on the same cases (paired against the shipped one)",
    )
    parser.add_argument("--families", nargs="+", default=["A", "B", "C", "D"])
    parser.add_argument(
        "--trained-on", nargs="+", default=["A"], help="families the shipped model saw"
    )
    parser.add_argument("--cases", type=int, default=8, help="test subjects per family")
    parser.add_argument("--seed", type=int, default=9000, help="seed of the first test subject")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-organ-quality"))
    parser.add_argument("--out", type=Path, default=RESULTS / "organ_quality")
    args = parser.parse_args()

    from medssl.synth.datasets import write_organ_dataset

    data = {}
    for k, family in enumerate(args.families):
        folder = args.work / "data" / family
        if not (folder / "dataset.json").is_file():
            write_organ_dataset(
                folder, cases=0, n_test=args.cases, domain=family, seed=args.seed + k * args.cases
            )
        data[family] = folder
    models = {args.model: (args.repository, args.model)}
    for spec in args.variant:
        repo, _, name = spec.rpartition(":")
        models[f"{name} ({repo})"] = (Path(repo), name)
    report: dict[str, Any] = {
        "benchmark": "organ_quality",
        "device": cpu_device(),
        "cases": args.cases,
        "seed": args.seed,
        "families": args.families,
        "trained_on": args.trained_on,
        "models": {},
    }
    for label, (repo, name) in models.items():
        report["models"][label] = {}
        for family, folder in data.items():
            print(f"{label} on {family} ...", file=sys.stderr, flush=True)
            found = score_family(repo, name, folder)
            values = np.array([c["dice"] for c in found["cases"].values()])
            found["summary"] = bootstrap_mean(values)
            report["models"][label][family] = found
    first = next(iter(report["models"].values()))
    for label in list(report["models"])[1:]:
        for family in args.families:
            a = np.array([c["dice"] for c in report["models"][label][family]["cases"].values()])
            b = np.array([c["dice"] for c in first[family]["cases"].values()])
            report["models"][label][family]["delta"] = bootstrap_mean(a - b)
    write_report(args.out, report, render(report))


if __name__ == "__main__":
    main()
