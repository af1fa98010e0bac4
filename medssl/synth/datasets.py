"""Write synthetic cases in the layouts users' real data comes in.

* Chest CT: the LUNA16 layout (:class:`~medssl.datasets.luna16.Luna16Writer`),
  or one DICOM study per scan in an NLST-like ``patient/study/series/`` tree
  with LUNA16-style CSVs beside it (``seriesuid`` = SeriesInstanceUID).
* Multi-organ phantom: the Decathlon layout, or (CT domains) one DICOM study per case with
  BodyPartExamined ``ABDOMEN``, its truth beside it as NIfTI (``labels/<case_id>.nii.gz``) and
  ``cases.csv`` mapping each case to its series.

Case ``i`` uses seed ``seed + i``; unlabeled chest scans continue the sequence. A chest
family (:data:`~medssl.synth.chest.FAMILIES`) adds its seed offset, so the scans, patient
IDs and UIDs of two families never coincide.

CSV semantics (LUNA16 columns ``seriesuid,coordX,coordY,coordZ,diameter_mm``):
``annotations.csv`` holds the nodules (a hit is a true positive),
``annotations_excluded.csv`` the micronodules and vessel crossings (LUNA16's irrelevant
findings: a hit counts neither way), ``lookalikes.csv`` the calcified granulomas and scars
(not nodules, not excluded: a hit is a false positive; in the LUNA16 layout they are also
class-0 rows of ``candidates_V2.csv``). See :mod:`medssl.synth.nodules`.

The unlabeled pool's hidden truth goes to ``unlabeled/`` (:data:`UNLABELED_TRUTH`):
for diagnostics such as the precision of pseudo-labels, never for training (the
trainer reads only volume files from ``unlabeled/``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import numpy as np

from medssl.datasets.decathlon import DecathlonWriter
from medssl.datasets.luna16 import Luna16Writer, write_findings
from medssl.finding import Finding
from medssl.io.dicom_writer import SeriesInfo, write_dicom_series
from medssl.io.metaimage import write_metaimage
from medssl.io.nifti import write_nifti
from medssl.synth.chest import SEED_SPAN, ChestCase, ChestConfig, generate_chest_ct
from medssl.synth.organs import DOMAINS, LABELS, domain_modality, generate_organ_phantom

__all__ = [
    "UNLABELED_TRUTH",
    "chest_findings",
    "chest_lookalikes",
    "chest_series_info",
    "organ_series_info",
    "write_chest_dataset",
    "write_organ_dataset",
]

#: Class-0 candidates drawn in the lungs per scan, like LUNA16's candidates_V2.
NEGATIVE_CANDIDATES = 20
#: The unlabeled pool's hidden truth, in ``unlabeled/``: nodules, excluded findings and
#: false-positive look-alikes (LUNA16 columns).
UNLABELED_TRUTH = (
    "truth_annotations.csv",
    "truth_annotations_excluded.csv",
    "truth_lookalikes.csv",
)


class _Visit(TypedDict):
    """The :class:`SeriesInfo` fields of a synthetic visit (DICOM DA, AS and TM text)."""

    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_id: str
    study_date: str
    study_time: str


def _synthetic_visit(
    rng: np.random.Generator, seed: int, ages: tuple[int, int], years: tuple[int, int]
) -> _Visit:
    """Deterministic demographics and study date/time of a synthetic subject (``SeriesInfo``
    fields): age in ``ages``, a study in ``years`` (half-open ranges)."""
    age = int(rng.integers(*ages))
    year = int(rng.integers(*years))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return {
        "patient_birth_date": f"{year - age}0101",
        "patient_sex": str(rng.choice(["F", "M"])),
        "patient_age": f"{age:03d}Y",
        "study_id": str(seed),
        "study_date": f"{year}{month:02d}{day:02d}",
        "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
    }


def chest_series_info(seed: int, case: ChestCase) -> SeriesInfo:
    """Plausible, deterministic patient / study / series tags for synthetic case ``seed``.

    ``seed``: the case's seed plus its family's seed offset (its random stream's seed).

    Patients are 55-74 years old, as NLST enrolled them; studies fall in
    2002-2004. UIDs derive from the seed, so regenerating gives the same UIDs.
    """
    visit = _synthetic_visit(np.random.default_rng([seed, 7]), seed, (55, 75), (2002, 2005))
    thickness = float(case.volume.meta.get("slice_thickness", case.volume.spacing[0]))
    kernel = str(case.volume.meta.get("kernel", "STANDARD"))
    return SeriesInfo(
        uid_seed=f"medssl-synth-chest-{seed}",
        patient_id=f"SYN{seed:06d}",
        patient_name=f"Synthetic^Chest{seed:06d}",
        **visit,
        accession_number=f"A{seed:07d}",
        study_description="CT CHEST LOW DOSE SCREENING",
        series_description=f"CHEST {thickness:g}MM {kernel}",
        slice_thickness=thickness,
        convolution_kernel=kernel,
        body_part="CHEST",
        model_name="medssl synthetic chest",
    )


def chest_findings(seriesuid: str, case: ChestCase) -> tuple[list[Finding], list[Finding]]:
    """``(nodules, excluded)`` as LUNA16 rows, nodules in ``case.nodules`` order."""
    nodules = [
        Finding(centre_lps=n.centre_lps, diameter_mm=n.diameter_mm, series_uid=seriesuid)
        for n in case.nodules
    ]
    excluded = [
        Finding(centre_lps=c.centre_lps, diameter_mm=c.diameter_mm, series_uid=seriesuid)
        for c in case.confusers
    ]
    return nodules, excluded


def chest_lookalikes(seriesuid: str, case: ChestCase) -> list[Finding]:
    """The granulomas and scars as LUNA16 rows (diameter: a scar's length): false positives

    if marked, so in neither ``annotations.csv`` nor ``annotations_excluded.csv``.
    """
    return [
        Finding(centre_lps=c.centre_lps, diameter_mm=c.diameter_mm, series_uid=seriesuid)
        for c in case.lookalikes
    ]


def write_chest_dataset(
    out: str | Path,
    cases: int,
    fmt: str = "luna16",
    seed: int = 0,
    unlabeled: int = 0,
    matrix: int = 512,
    n_slices: int | None = None,
    progress: Callable[[], None] | None = None,
    *,
    family: str = "train",
) -> list[Path]:
    """Generate ``cases`` annotated and ``unlabeled`` plain chest CT scans into ``out``.

    Args:
        fmt: ``"luna16"`` or ``"dicom"``.
        seed: seed of the first case, in ``[0, SEED_SPAN - cases - unlabeled]``; the
            family's seed offset is added (:class:`~medssl.synth.chest.ChestConfig`).
        matrix, n_slices: grid size (see :class:`~medssl.synth.chest.ChestConfig`).
        progress: called once per scan written.
        family: the generator family, ``"train"`` or ``"heldout"``
            (:data:`~medssl.synth.chest.FAMILIES`).

    Returns:
        The written scans: ``.mhd`` files, or series folders for DICOM.
    """
    if fmt not in ("luna16", "dicom"):
        raise ValueError(f"fmt must be 'luna16' or 'dicom', got {fmt!r}")
    out = Path(out)
    config = ChestConfig.for_family(family, matrix=matrix, n_slices=n_slices)
    if not 0 <= seed <= SEED_SPAN - cases - unlabeled:
        raise ValueError(
            f"seed must be in [0, {SEED_SPAN - cases - unlabeled}] for "
            f"{cases + unlabeled} scans (seeds stay below {SEED_SPAN}), got {seed}"
        )
    writer = Luna16Writer(out) if fmt == "luna16" else None
    # (annotations, excluded, lookalikes) of the labeled scans, and of the unlabeled pool
    tables: dict[bool, tuple[list[Finding], list[Finding], list[Finding]]] = {
        True: ([], [], []),
        False: ([], [], []),
    }
    written = []
    for i in range(cases + unlabeled):
        case_seed = seed + i
        case = generate_chest_ct(case_seed, config)
        info = chest_series_info(case_seed + config.seed_offset, case)
        uid = info.uid("series")
        labeled = i < cases
        nodules, excluded = chest_findings(uid, case)
        lookalikes = chest_lookalikes(uid, case)
        for table, rows in zip(tables[labeled], (nodules, excluded, lookalikes)):
            table += rows
        if fmt == "dicom":
            folder = (
                out
                / info.patient_id
                / f"{info.study_date}-{info.accession_number}"
                / (f"{info.series_number}-{info.series_description.replace(' ', '_')}")
            )
            write_dicom_series(case.volume, folder, info)
            written.append(folder)
        elif labeled:
            written.append(
                writer.add(  # type: ignore[union-attr]
                    uid,
                    case.volume,
                    nodules,
                    excluded,
                    lung_mask=case.lung_mask,
                    nodule_mask=_relabel(case),
                    negatives=[f.centre_lps for f in lookalikes]
                    + _lung_points(case, case_seed + config.seed_offset),
                    truth=[{"kind": n.kind, "location": n.location} for n in case.nodules],
                )
            )
        else:
            written.append(write_metaimage(case.volume, out / "unlabeled" / f"{uid}.mhd"))
        if progress:
            progress()
    if unlabeled:
        hidden = out / "unlabeled"
        hidden.mkdir(parents=True, exist_ok=True)
        for name, rows in zip(UNLABELED_TRUTH, tables[False]):
            write_findings(hidden / name, rows)
    if writer is not None:
        writer.close()
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_findings(out / "annotations.csv", tables[True][0])
        write_findings(out / "annotations_excluded.csv", tables[True][1])
    write_findings(out / "lookalikes.csv", tables[True][2])
    return written


def organ_series_info(seed: int, domain: str, thickness_mm: float) -> SeriesInfo:
    """Plausible, deterministic tags for abdominal phantom ``seed`` seen by ``domain``.

    Adults of 30-84 years, portal-venous CT of 2020-2024; UIDs derive from the seed and the
    domain, so regenerating gives the same UIDs and two domains never share them.
    """
    return SeriesInfo(
        uid_seed=f"medssl-synth-organs-{domain}-{seed}",
        patient_id=f"SYNABD{seed:06d}{domain.upper()}",
        patient_name=f"Synthetic^Abdomen{seed:06d}",
        **_synthetic_visit(np.random.default_rng([seed, 17]), seed, (30, 85), (2020, 2025)),
        accession_number=f"B{seed:07d}",
        study_description="CT ABDOMEN WITH CONTRAST",
        series_description=f"ABDOMEN PV {thickness_mm:g}MM",
        slice_thickness=thickness_mm,
        body_part="ABDOMEN",
        model_name=f"medssl synthetic organs {domain}",
        window=(40.0, 400.0),
    )


def write_organ_dataset(
    out: str | Path,
    cases: int,
    n_test: int = 0,
    domain: str = "A",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    progress: Callable[[], None] | None = None,
    *,
    fmt: str = "decathlon",
) -> Path:
    """Generate the multi-organ phantom; returns ``dataset.json`` (Decathlon) or ``cases.csv``.

    Training case ``i`` is ``organs_{seed+i:04d}``; test cases follow.

    Args:
        fmt: ``"decathlon"`` (imagesTr/labelsTr/imagesTs/labelsTs), or ``"dicom"``: every
            case, training and test alike, as one CT study
            ``OUT/<PatientID>/<StudyDate>-<Accession>/1-<description>/`` (BodyPartExamined
            ``ABDOMEN``), its label map as ``OUT/labels/<case_id>.nii.gz`` and a row of
            ``OUT/cases.csv`` (``case_id,split,series_uid,series_dir,label``). CT domains only.

    Raises:
        ValueError: an unknown ``fmt``, or ``"dicom"`` for an MR domain (medssl writes CT
            Image Storage only).
    """
    if fmt not in ("decathlon", "dicom"):
        raise ValueError(f"fmt must be 'decathlon' or 'dicom', got {fmt!r}")
    if fmt == "dicom":
        return _write_organ_dicom(Path(out), cases, n_test, domain, seed, shape, progress)
    writer = DecathlonWriter(
        out,
        name=f"medssl synthetic organs, domain {domain}",
        labels=LABELS,
        modality=domain_modality(domain),
        description="Synthetic abdominal multi-organ phantom (medssl.synth.organs)",
    )
    for i in range(cases + n_test):
        case = generate_organ_phantom(seed + i, domain, shape=shape)
        case_id = f"organs_{seed + i:04d}"
        if i < cases:
            writer.add_training(case_id, case.image, case.label)
        else:
            writer.add_test(case_id, case.image, case.label)
        if progress:
            progress()
    return writer.close()


def _write_organ_dicom(
    out: Path,
    cases: int,
    n_test: int,
    domain: str,
    seed: int,
    shape: tuple[int, int, int] | None,
    progress: Callable[[], None] | None,
) -> Path:
    if domain_modality(domain) != "CT":
        raise ValueError(
            f"domain {domain!r} is {domain_modality(domain)}; --format dicom writes CT "
            f"series only (choose a CT domain: "
            f"{', '.join(sorted(d for d, v in DOMAINS.items() if v.modality == 'CT'))})"
        )
    rows = ["case_id,split,series_uid,series_dir,label"]
    for i in range(cases + n_test):
        case = generate_organ_phantom(seed + i, domain, shape=shape)
        case_id = f"organs_{seed + i:04d}"
        info = organ_series_info(seed + i, domain, float(case.image.spacing[0]))
        folder = (
            Path(info.patient_id)
            / f"{info.study_date}-{info.accession_number}"
            / (f"{info.series_number}-{info.series_description.replace(' ', '_')}")
        )
        write_dicom_series(case.image, out / folder, info)
        label = Path("labels") / f"{case_id}.nii.gz"
        write_nifti(case.label, out / label)
        rows.append(
            f"{case_id},{'training' if i < cases else 'test'},{info.uid('series')},{folder},{label}"
        )
        if progress:
            progress()
    table = out / "cases.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def _relabel(case: ChestCase) -> np.ndarray:
    """Nodule mask with nodule ``k`` of ``case.nodules`` (from 1) as label ``k``."""
    out = np.zeros(case.nodule_mask.shape, dtype=np.uint8)
    for k, nodule in enumerate(case.nodules, start=1):
        out[case.nodule_mask == nodule.label] = k
    return out


def _lung_points(case: ChestCase, seed: int) -> list[tuple[float, float, float]]:
    """Random LPS points in the lungs, away from nodules: class-0 candidates."""
    free = case.lung_mask & (case.nodule_mask == 0)
    index = np.argwhere(free)
    if len(index) == 0:
        return []
    rng = np.random.default_rng([seed, 11])
    chosen = index[rng.choice(len(index), size=min(NEGATIVE_CANDIDATES, len(index)), replace=False)]
    return [tuple(p) for p in case.volume.index_to_world(chosen.astype(np.float64))]
