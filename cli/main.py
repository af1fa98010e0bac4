"""The ``medssl`` command group: ``synth``, ``index`` and ``info``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medssl import __version__
from medssl.cli.errors import MedsslGroup
from medssl.cli.export import export
from medssl.cli.score import score_group
from medssl.cli.serve import serve
from medssl.cli.train import train
from medssl.index import index_table, write_index_table
from medssl.io import read_volume
from medssl.synth.datasets import write_chest_dataset, write_organ_dataset
from medssl.synth.organs import DOMAINS, RANDOMISED, domain_modality

__all__ = ["cli"]

#: Skipped (non-DICOM or unreadable) files listed by ``medssl index`` before it only counts.
SHOW_SKIPPED = 20
#: Series ``medssl index`` prints; an archive's index is read from its table.
SHOW_SERIES = 200


def _progress(description: str, total: int) -> tuple[Progress, object]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),  # stdout carries only results
    )
    return progress, progress.add_task(description, total=total)


@click.group(cls=MedsslGroup)
@click.version_option(__version__, prog_name="medssl")
def cli() -> None:
    """medssl: semi-supervised 3D CT, from unlabeled archives to DICOM results.

    Data tools: generate synthetic CT (synth), index DICOM trees (index), and
    describe any volume (info). Training, export, serving and scoring are the
    medssl-train, medssl-export, medssl-serve and medssl-score commands.
    """


@cli.group(cls=MedsslGroup)
def synth() -> None:
    """Generate synthetic CT with ground truth, in real dataset layouts."""


@synth.command("chest")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=10, show_default=True, help="Annotated scans to generate.")
@click.option(
    "--unlabeled",
    default=0,
    show_default=True,
    help="Extra scans without annotations (the unlabeled pool), in OUT/unlabeled.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["luna16", "dicom"]),
    default="luna16",
    show_default=True,
    help="LUNA16 layout (.mhd + CSVs) or one DICOM study per scan.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the first case; case i uses seed+i."
)
@click.option(
    "--matrix", default=512, show_default=True, help="In-plane matrix size (rows = columns)."
)
@click.option(
    "--slices",
    type=int,
    default=None,
    help="Slices per scan (default: enough for the chest at the drawn thickness).",
)
@click.option(
    "--family",
    type=click.Choice(["train", "heldout"]),
    default="train",
    show_default=True,
    help="Generator family: parameter ranges and seed space (train on one, test on the other).",
)
def synth_chest(
    out: Path,
    cases: int,
    unlabeled: int,
    fmt: str,
    seed: int,
    matrix: int,
    slices: int | None,
    family: str,
) -> None:
    """Chest CT with lung nodules (a LUNA16 lookalike), written to OUT.

    Each scan draws its own pixel spacing, slice thickness, noise, kernel
    (smooth or edge-enhancing), habitus and IV contrast from its family's
    ranges (medssl.synth.chest.FAMILIES). Nodules are solid, part-solid or
    ground-glass, 3-30 mm, free, juxta-pleural or juxta-vascular; sub-3 mm
    nodules and vessel crossings are listed as excluded findings; calcified
    granulomas and scars (lookalikes.csv) are not nodules: a mark on one is a
    false positive. Some scans show breathing motion. The unlabeled pool's
    hidden truth goes to OUT/unlabeled/truth_*.csv.
    """
    progress, task = _progress("chest CT", cases + unlabeled)
    with progress:
        written = write_chest_dataset(
            out,
            cases=cases,
            unlabeled=unlabeled,
            fmt=fmt,
            seed=seed,
            matrix=matrix,
            n_slices=slices,
            progress=lambda: progress.advance(task),  # type: ignore[arg-type]
            family=family,
        )
    click.echo(f"wrote {len(written)} scans ({fmt}) to {out}")


@synth.command("archive")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", default=20, show_default=True, help="Intact chest CT studies.")
@click.option(
    "--broken",
    default=0,
    show_default=True,
    help="Extra studies with a damaged CT series (truncated file, missing slice, displaced slice).",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the first study; study i uses seed+i."
)
@click.option("--matrix", default=512, show_default=True, help="In-plane matrix size.")
@click.option(
    "--slices", type=int, default=None, help="Slices per CT series (default: the chest's extent)."
)
@click.option(
    "--family",
    type=click.Choice(["train", "heldout"]),
    default="train",
    show_default=True,
    help="Chest generator family (parameter ranges and seed space).",
)
def synth_archive(
    out: Path, studies: int, broken: int, seed: int, matrix: int, slices: int | None, family: str
) -> None:
    """An NLST-like DICOM archive: CT studies with localizers, plus deliberately broken series."""
    from medssl.synth.archive import write_archive

    info = write_archive(
        out, studies, broken=broken, seed=seed, matrix=matrix, n_slices=slices, family=family
    )
    click.echo(
        f"wrote {len(info.good)} CT series, {len(info.localizers)} localizers and "
        f"{len(info.broken)} broken series to {out}"
    )


@synth.command("organs")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=10, show_default=True, help="Labelled training cases (imagesTr).")
@click.option(
    "--test",
    "n_test",
    default=0,
    show_default=True,
    help="Test cases (imagesTs, with their truth in labelsTs).",
)
@click.option(
    "--domain",
    "domains",
    type=click.Choice([*sorted(DOMAINS), RANDOMISED]),
    multiple=True,
    help="Scanner/modality domain: A-D (multi-vendor CT), ct / mr (UDA pair), or rand "
    "(SynthSeg-style domain randomisation: every case its own contrast, noise, blur, "
    "resolution, bias, body size, shape deformation and FOV); default A. "
    "Repeat it to write OUT/<domain>/ per domain (the layout medssl-train's segmentation "
    "settings read), each domain with its own subjects.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the first case; case i uses seed+i."
)
@click.option(
    "--shape", nargs=3, type=int, default=None, help="Grid size Z Y X (default: the domain's own)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["decathlon", "dicom"]),
    default="decathlon",
    show_default=True,
    help="Decathlon layout (NIfTI), or one DICOM CT study per case (BodyPartExamined ABDOMEN) "
    "with its truth in OUT/labels and OUT/cases.csv; CT domains only.",
)
def synth_organs(
    out: Path,
    cases: int,
    n_test: int,
    domains: tuple[str, ...],
    seed: int,
    shape: tuple[int, int, int] | None,
    fmt: str,
) -> None:
    """Abdominal multi-organ phantom for segmentation, in the Decathlon layout or as DICOM
    studies."""
    domains = domains or ("A",)
    not_ct = [d for d in domains if domain_modality(d) != "CT"]
    if fmt == "dicom" and not_ct:
        raise click.BadParameter(
            f"domain(s) {', '.join(not_ct)} are MR; --format dicom writes CT series only",
            param_hint="--domain",
        )
    if shape and RANDOMISED in domains:
        raise click.BadParameter(
            f"domain {RANDOMISED} draws its own grid per case", param_hint="--shape"
        )
    several = len(domains) > 1
    for k, domain in enumerate(domains):
        progress, task = _progress(f"organs ({domain})", cases + n_test)
        with progress:
            write_organ_dataset(
                out / domain if several else out,
                cases=cases,
                n_test=n_test,
                domain=domain,
                # Distinct subjects per domain: a UDA target must not be the source's twins.
                seed=seed + k * (cases + n_test),
                shape=shape or None,
                progress=lambda p=progress, t=task: p.advance(t),  # type: ignore[misc]
                fmt=fmt,
            )
    where = f"{out}/{{{','.join(domains)}}}" if several else str(out)
    if fmt == "dicom":
        n = cases + n_test
        made = f"{n} abdominal CT stud{'y' if n == 1 else 'ies'} (truth in labels/ and cases.csv)"
    else:
        made = f"{cases} training and {n_test} test cases"
    click.echo(f"wrote {made} per domain ({', '.join(domains)}) to {where}")


@cli.group(cls=MedsslGroup)
def convert() -> None:
    """Convert the layouts the SSL literature ships into the Decathlon layout medssl-train reads."""


@convert.command("la-h5")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--lists",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of train.list / test.list (default: SRC, then its parent).",
)
def convert_la_h5(src: Path, out: Path, lists: Path | None) -> None:
    """UA-MT's Left Atrium (<case>/mri_norm2.h5, the 80/20 lists) → Decathlon OUT."""
    from medssl.datasets.convert import la_h5_to_decathlon

    click.echo(f"wrote {la_h5_to_decathlon(src, out, lists)}")


@convert.command("ad-npy")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--label",
    "labels",
    multiple=True,
    required=True,
    metavar="CODE=NAME",
    help="A label of the dataset, e.g. --label 1=spleen (repeat; background is added).",
)
@click.option(
    "--spacing",
    nargs=3,
    type=float,
    default=(1.0, 1.0, 1.0),
    show_default=True,
    help="Voxel size Z Y X mm (the npy layout does not store it).",
)
@click.option(
    "--axis-order",
    type=click.Choice(["zyx", "xyz"]),
    default="zyx",
    show_default=True,
    help="How the arrays are stored: zyx (Synapse, MMWHS, M&Ms) or xyz (LA).",
)
@click.option("--modality", default="CT", show_default=True)
def convert_ad_npy(
    src: Path,
    out: Path,
    labels: tuple[str, ...],
    spacing: tuple[float, float, float],
    axis_order: str,
    modality: str,
) -> None:
    """A&D's npy/ + split_txts/ → Decathlon OUT (the test split becomes imagesTs)."""
    from medssl.datasets.convert import ad_npy_to_decathlon

    names = {0: "background"}
    for item in labels:
        code, sep, name = item.partition("=")
        if not sep or not code.strip().isdigit() or not name.strip():
            raise click.BadParameter(
                f"{item!r} must look like CODE=NAME, e.g. 1=spleen", param_hint="--label"
            )
        names[int(code)] = name.strip()
    path = ad_npy_to_decathlon(src, out, names, modality, spacing=spacing, axis_order=axis_order)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the table: FILE.parquet or FILE.csv. Resumable: progress is kept in "
    "FILE.parts/ until the table is written.",
)
@click.option("--workers", type=int, default=None, help="Header-reading processes (default: auto).")
def index(root: Path, out: Path | None, workers: int | None) -> None:
    """Index the DICOM files under ROOT by header: one row per series.

    Prints full UIDs, modality, slice count, thickness and orientation (the first
    SHOW_SERIES series; the table holds all). Files that are not DICOM or do not parse
    are counted and listed on stderr. With --out, an interrupted run picks up where it
    stopped when run again with the same ROOT and --out.
    """
    import shutil

    if out is not None and out.suffix not in (".parquet", ".csv"):
        raise click.UsageError(f"--out {out}: index tables are .parquet or .csv")
    parts = None if out is None else out.with_name(out.name + ".parts")
    progress, task = _progress("indexing", None)  # type: ignore[arg-type]
    with progress:

        def update(n: int) -> None:
            progress.update(task, completed=n)  # type: ignore[arg-type]

        table, unreadable = index_table(root, workers=workers, progress=update, parts=parts)
    columns = [
        "series_uid",
        "study_uid",
        "patient_id",
        "modality",
        "n_slices",
        "slice_thickness",
        "orientation",
        "series_description",
    ]
    shown = table.slice(0, SHOW_SERIES).select(columns).to_pylist()
    rows = [[_text(r[c]) for c in columns] for r in shown]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if table.num_rows > SHOW_SERIES:
        click.echo(
            f"... and {table.num_rows - SHOW_SERIES} more series"
            + (f" (all in {out})" if out else "")
        )
    n_files = sum(table["n_files"].to_pylist())
    click.echo(f"{table.num_rows} series, {n_files} files", err=True)
    for path, problem in unreadable[:SHOW_SKIPPED]:
        click.echo(f"skipped {path}: {problem}", err=True)
    if len(unreadable) > SHOW_SKIPPED:
        click.echo(f"... and {len(unreadable) - SHOW_SKIPPED} more files skipped", err=True)
    if out is not None:
        write_index_table(table, out)
        if parts is not None:
            shutil.rmtree(parts, ignore_errors=True)
        click.echo(f"wrote {out}", err=True)


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--series-uid", default=None, help="Which series, when PATH holds several.")
def info(path: Path, as_json: bool, series_uid: str | None) -> None:
    """Geometry and intensity range of a volume (DICOM file/folder, NIfTI, MetaImage).

    A DICOM series is named by its SeriesInstanceUID, or, where an anonymiser blanked it, by
    the ``nouid-...`` key medssl-score gives it (``--series-uid`` takes either).

    shape and spacing are in array order (z, y, x); origin is the LPS position
    (x, y, z) of voxel (0, 0, 0) in mm; direction columns are the LPS unit
    vectors of the z, y, x axes; affine maps (z, y, x, 1) to LPS (x, y, z, 1).
    """
    volume = read_volume(path, series_uid=series_uid)
    summary = volume.summary()
    if "series_key" in volume.meta:  # DICOM: the SeriesInstanceUID, or the key derived without one
        summary["series_key"] = volume.meta["series_key"]
        summary["series_uid_absent"] = bool(volume.meta.get("series_uid_absent"))
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"path:        {path}")
    click.echo(f"format:      {summary['format']}")
    if "series_key" in summary:
        absent = "  (no SeriesInstanceUID: key derived from its SOP Instance UIDs)"
        click.echo(
            f"series:      {summary['series_key']}{absent if summary['series_uid_absent'] else ''}"
        )
    click.echo(f"shape:       {summary['shape']}  (z, y, x)")
    click.echo(f"spacing:     {_fmt(summary['spacing'])} mm  (z, y, x)")
    click.echo(f"origin:      {_fmt(summary['origin'])} mm  (LPS x, y, z)")
    columns = zip("zyx", zip(*summary["direction"]))
    click.echo(
        "direction:   "
        + "  ".join(f"{axis}->{_fmt(list(c))}" for axis, c in columns)
        + "  (LPS unit vector of each index axis)"
    )
    click.echo(f"intensity:   {summary['min']:g} .. {summary['max']:g}")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _text(value: object) -> str:
    return "" if value is None else str(value)


# --- medssl evaluate -------------------------------------------------------------------------


@cli.group(cls=MedsslGroup)
def evaluate() -> None:
    """Score CAD results against a benchmark's reference standard."""


@evaluate.command("luna16")
@click.option(
    "--annotations",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="annotations.csv: seriesuid,coordX,coordY,coordZ,diameter_mm (world mm).",
)
@click.option(
    "--excluded",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="annotations_excluded.csv: irrelevant findings, neither hits nor FPs.",
)
@click.option(
    "--seriesuids",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="seriesuids.csv: the evaluated scans, one per line (the FP/scan divisor).",
)
@click.option(
    "--predictions",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Submission CSV: seriesuid,coordX,coordY,coordZ,probability.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write froc.png and froc.json to this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object and nothing else.")
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Bootstrap samples over scans, for the 95% CIs.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option(
    "--cpm-definition",
    type=click.Choice(["interpolated", "grid"]),
    default="interpolated",
    show_default=True,
    help="interpolated: read the FROC at exactly 1/8 ... 8 FP/scan (LUNA16 paper, MONAI); "
    "grid: at the official script's 10001-point grid (0.2502125 for 1/4, ...).",
)
def evaluate_luna16_command(
    annotations: Path,
    excluded: Path,
    seriesuids: Path,
    predictions: Path,
    out: Path | None,
    as_json: bool,
    n_bootstrap: int,
    seed: int,
    cpm_definition: str,
) -> None:
    """LUNA16 FROC and CPM, with the matching rules of the official noduleCADEvaluationLUNA16.py.

    Sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan, their
    mean (the CPM), and bootstrap 95% confidence intervals over scans. By default
    the FROC is interpolated at exactly those rates (the LUNA16 paper's
    definition); --cpm-definition grid reproduces the official script's printout.
    """
    from medssl.metrics.luna16 import evaluate_luna16_files, plot_froc  # sklearn: slow import

    result = evaluate_luna16_files(
        annotations,
        excluded,
        seriesuids,
        predictions,
        n_bootstrap=n_bootstrap,
        seed=seed,
        cpm_definition=cpm_definition,
    )
    summary = result.to_json()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "froc.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            plot_froc(result, out / "froc.png")
        except ImportError as exc:
            raise click.ClickException(
                f"froc.png needs matplotlib ({exc}); pip install matplotlib"
            ) from exc
        click.echo(f"wrote {out / 'froc.json'} and {out / 'froc.png'}", err=True)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo("FP/scan  sensitivity  95% CI")
    for rate, sens, (lo, hi) in zip(result.fp_rates, result.sensitivities, result.sensitivity_ci):
        click.echo(f"{rate:>7g}  {sens:>11.4f}  [{lo:.4f}, {hi:.4f}]")
    click.echo(f"{'CPM':>7}  {result.cpm:>11.4f}  [{result.cpm_ci[0]:.4f}, {result.cpm_ci[1]:.4f}]")
    click.echo(
        f"{result.n_scans} scans, {result.n_nodules} nodules, {result.n_candidates} marks: "
        f"{result.n_true_positives} nodules hit, {result.n_false_positives} false positives"
    )


cli.add_command(train, "train")
cli.add_command(export, "export")
cli.add_command(score_group, "score")
cli.add_command(serve, "serve")
