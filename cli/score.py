"""``medssl-score``: batch scoring of CT archives into Parquet tables (and DICOM results)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from medssl.cli.errors import MedsslCommand, MedsslGroup

__all__ = ["merge", "score", "score_group"]

DEFAULT_MODEL = "focalmix-nodules"


def _default_repository() -> Path:
    """The repository shipped next to the package (a source checkout), else ./model_repository."""
    shipped = Path(__file__).resolve().parents[1] / "model_repository"
    return shipped if shipped.is_dir() else Path("model_repository")


@click.command(cls=MedsslCommand)
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model", default=DEFAULT_MODEL, show_default=True, help="Model name in the repository."
)
@click.option(
    "--repository",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model repository [default: the shipped model_repository/].",
)
@click.option(
    "--version", "model_version", type=int, default=None, help="Model version [default: newest]."
)
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "triton"]),
    default="onnxruntime",
    show_default=True,
    help="Embedded onnxruntime, or a Triton server (--triton-url).",
)
@click.option(
    "--triton-url", default=None, help="host:port of the Triton server (with --backend triton)."
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "onnxruntime", "openvino"]),
    default="auto",
    show_default=True,
    help="Embedded runtime (--backend onnxruntime): auto = OpenVINO on a CPU when installed "
    "(the fastest), onnxruntime when it has a GPU provider.",
)
@click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default="grpc",
    show_default=True,
    help="Triton protocol.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder: series.parquet, findings.parquet, score.sqlite (resumable).",
)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Read/preprocess workers [default: CPUs - 1; 0 = in the main process].",
)
@click.option(
    "--ray-address", default=None, help="Existing Ray cluster ('auto'); default: a local Ray."
)
@click.option(
    "--select",
    "select_rules",
    default=None,
    help="Selection rules: a YAML/JSON file or key=value "
    "pairs, e.g. per_study=thinnest,min_slices=64. They replace, key by key, the series the "
    "model card says the model is for (its 'selection'; without one: thin-slice axial CT, "
    "min_slices=32, max_thickness_mm=2.5).",
)
@click.option(
    "--write-dicom", is_flag=True, help="Also write a TID 1500 SR per DICOM series (OUT/dicom/)."
)
@click.option(
    "--sr-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="With --write-dicom: findings at or above this probability go into the SR/SEG "
    "[default: the model card's operating point, chosen on validation; 0.5 for a card "
    "without one]. findings.parquet keeps every candidate with a 'passed' column.",
)
@click.option(
    "--seg-type",
    type=click.Choice(["binary", "labelmap", "labelmap-rle"]),
    default="binary",
    show_default=True,
    help="Segmentation models with --write-dicom: SEG type; LABELMAP (DICOM 2024c) is not read by "
    "Orthanc 1.10, dcmtk 3.6.7 or dciodvfy 2022.",
)
@click.option(
    "--dense-seg",
    is_flag=True,
    help="With --write-dicom: keep the SEG's empty frames (default: omitted).",
)
@click.option("--limit", type=int, default=None, help="Score at most N series (after selection).")
@click.option(
    "--batch-size", type=int, default=2, show_default=True, help="Windows per model call."
)
@click.option(
    "--shard",
    "shard_text",
    default=None,
    metavar="I/N",
    help="Score only shard I of N (1-based; split by study, the same on every machine). "
    "Join the shards' --out folders with `medssl score merge`.",
)
def score(
    source: Path,
    model: str,
    repository: Path | None,
    model_version: int | None,
    backend: str,
    triton_url: str | None,
    runtime: str,
    protocol: str,
    out: Path,
    engine: str,
    workers: int | None,
    ray_address: str | None,
    select_rules: str | None,
    write_dicom: bool,
    sr_threshold: float | None,
    seg_type: str,
    dense_seg: bool,
    limit: int | None,
    batch_size: int,
    shard_text: str | None,
) -> None:
    """Score every selected series of SOURCE with a detection model.

    SOURCE is a DICOM tree, an index from `medssl index` (.parquet/.csv), a LUNA16 folder
    (or one subsetN), a Decathlon folder (imagesTs) or a .txt list of volume paths.
    Re-running the same command resumes: finished series are not scored again.
    """
    from medssl.scoring import RunnerSpec, ScoreOptions, parse_rules
    from medssl.scoring import score as run_score
    from medssl.scoring.series import DicomOutput
    from medssl.scoring.shard import parse_shard

    if sr_threshold is not None and not write_dicom:
        raise click.UsageError(
            "--sr-threshold sets what goes into the SR/SEG: use it with --write-dicom"
        )
    if backend == "triton" and not triton_url:
        raise click.UsageError("--backend triton needs --triton-url host:port")
    spec = RunnerSpec(
        repository or _default_repository(),
        model,
        model_version,
        triton_url if backend == "triton" else None,
        protocol,
        runtime=runtime,
    )
    options = ScoreOptions(
        engine=engine,
        batch_size=batch_size,
        limit=limit,
        ray_address=ray_address,
        shard=parse_shard(shard_text) if shard_text else None,
        dicom=DicomOutput(out / "dicom", sr_threshold, seg_type=seg_type, dense_seg=dense_seg)
        if write_dicom
        else None,
        **({"workers": workers} if workers is not None else {}),
    )
    console = Console(stderr=True)
    start = time.perf_counter()

    def progress(done: int, total: int, counts: dict[str, int]) -> None:
        elapsed = time.perf_counter() - start
        rate = done / elapsed * 3600 if elapsed > 0 else 0.0
        eta = (total - done) / (done / elapsed) if done else float("nan")
        console.print(
            f"{done}/{total} series | {rate:.0f} scans/h | ETA {eta:.0f} s | "
            f"failed {counts.get('failed', 0)}",
            highlight=False,
        )

    rules = parse_rules(select_rules, base=spec.card().selection_rules()) if select_rules else None
    summary = run_score(source, out, spec, rules, options, progress)
    table = Table(
        title=f"medssl-score: {source} → {out}"
        + (f" (shard {options.shard})" if options.shard else "")
    )
    for column in ("series", "ok", "skipped", "failed", "scored now", "resumed", "scans/hour"):
        table.add_column(column, justify="right")
    counts = summary.counts
    table.add_row(
        str(summary.total),
        str(counts.get("ok", 0)),
        str(counts.get("skipped", 0)),
        str(counts.get("failed", 0)),
        str(summary.scored_now),
        str(summary.resumed),
        f"{summary.scans_per_hour:.0f}",
    )
    Console().print(table)
    _print_findings(out)
    if summary.unreadable_files:
        click.echo(
            f"{summary.unreadable_files} file(s) under {source} are not DICOM or do not parse "
            "(listed in OUT/unreadable.csv)",
            err=True,
        )
    for path in summary.outputs:
        click.echo(f"wrote {path}")
    if counts.get("failed", 0):
        click.echo(
            f"{counts['failed']} series failed; their "
            "reasons are in series.parquet (status 'failed')",
            err=True,
        )
        raise SystemExit(3)


def _print_findings(out: Path, top: int = 20) -> None:
    """What the run reports: the findings at or above each series' operating point (the ones in
    its SR/SEG), by series and descending probability, in LPS mm, at most ``top`` lines; then how
    many candidates below it findings.parquet keeps. A segmentation run prints label volumes."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "findings.parquet").to_pylist()
    if rows and rows[0]["volume_ml"] is not None:
        _print_volumes(rows)
        return
    series = {r["key"]: r for r in pq.read_table(out / "series.parquet").to_pylist()}
    thresholds = sorted(
        {s["report_threshold"] for s in series.values() if s["report_threshold"] is not None}
    )
    at = ", ".join(f"{t:.3f}" for t in thresholds) or "none"
    reported = sorted(
        (r for r in rows if r["passed"]), key=lambda r: (r["series_uid"], -r["probability"])
    )
    below = len(rows) - len(reported)
    scanned = sum(1 for s in series.values() if s["status"] == "ok")
    if not reported:
        click.echo(
            f"no findings at the operating point (p >= {at}) in {scanned} series; "
            f"{below} candidate(s) below it are in findings.parquet"
        )
        return
    table = Table(
        title=f"{len(reported)} finding(s) at the operating point (p >= {at}) in {scanned} series"
        + (f", first {top}" if len(reported) > top else "")
        + "; centres in LPS mm"
    )
    for column in ("series", "#", "x (L)", "y (P)", "z (S)", "diam. mm", "p"):
        table.add_column(column, justify="right")
    number: dict[str, int] = {}
    for r in reported[:top]:
        number[r["series_uid"]] = number.get(r["series_uid"], 0) + 1
        table.add_row(
            r["series_uid"][-24:],
            str(number[r["series_uid"]]),
            f"{r['x_mm']:.1f}",
            f"{r['y_mm']:.1f}",
            f"{r['z_mm']:.1f}",
            f"{r['diameter_mm']:.1f}",
            f"{r['probability']:.2f}",
        )
    Console().print(table)
    click.echo(
        f"{below} candidate(s) below the operating point "
        "are kept in findings.parquet (passed = false)"
    )


def _print_volumes(rows: list[dict], top: int = 4) -> None:
    """Segmentation runs: the volume (mL) of each label, one column per series (the first
    ``top``)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    series = list(dict.fromkeys(r["key"] for r in rows))[:top]
    total = len({r["key"] for r in rows})
    table = Table(
        title=f"label volumes, mL ({len(series)} of {total} series; all in findings.parquet)"
    )
    table.add_column("label")
    for key in series:
        table.add_column(key[-20:], justify="right")
    by_key = {(r["key"], r["label"]): r["volume_ml"] for r in rows}
    for label in labels:
        table.add_row(label, *(f"{by_key.get((key, label), 0.0):.1f}" for key in series))
    Console().print(table)


@click.command(cls=MedsslCommand)
@click.argument(
    "shards", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The merged output folder (new).",
)
def merge(shards: tuple[Path, ...], out: Path) -> None:
    """Join the --out folders of sharded medssl-score runs (--shard I/N) into one.

    Writes OUT/series.parquet, OUT/findings.parquet (and a LUNA16 submission.csv,
    unreadable.csv when the shards wrote them): the tables one run over the whole
    archive gives. Label maps and DICOM outputs stay in the shards' folders.
    """
    from medssl.scoring.merge import merge_outputs

    summary = merge_outputs(shards, out)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(summary.counts.items()))
    click.echo(f"merged {len(shards)} folder(s): {summary.series} series ({counts})")
    for path in summary.outputs:
        click.echo(f"wrote {path}")


class _ScoreGroup(MedsslGroup):
    """``medssl score``: ``merge``, or anything else is ``medssl-score``'s arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ScoreGroup)
def score_group() -> None:
    """Score archives: `medssl score SOURCE --out DIR ...` is medssl-score; `medssl score merge`
    joins the outputs of sharded runs."""


score_group.add_command(score, "run")
score_group.add_command(merge, "merge")
