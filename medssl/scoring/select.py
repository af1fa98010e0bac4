"""Which series of an archive get scored, and why the others do not.

The default rules pick what a chest CT detector was trained on: original, primary, axial CT
with at least 32 slices no thicker than 2.5 mm; localizers (scouts) are never scored. Rules
come from a small YAML/JSON file or ``key=value`` pairs (``medssl-score --select``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from medssl.errors import ConfigError
from medssl.scoring.manifest import ScanItem

__all__ = [
    "SelectionRules",
    "Skip",
    "parse_rules",
    "rules_from_mapping",
    "rules_to_mapping",
    "select_series",
]


#: Modality defined terms (PS3.3 C.7.3.1.1.1) a skip reason may quote; any other value is
#: not quoted, since a damaged or hostile header may hold anything there, PHI included.
_MODALITIES = frozenset(
    {
        "AR",
        "ASMT",
        "AU",
        "BDUS",
        "BI",
        "BMD",
        "CR",
        "CT",
        "CTPROTOCOL",
        "DG",
        "DOC",
        "DX",
        "ECG",
        "EPS",
        "ES",
        "FID",
        "GM",
        "HC",
        "HD",
        "IO",
        "IOL",
        "IVOCT",
        "IVUS",
        "KER",
        "KO",
        "LEN",
        "LS",
        "MG",
        "MR",
        "M3D",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPTBSV",
        "OPTENF",
        "OPV",
        "OSS",
        "OT",
        "PLAN",
        "PR",
        "PT",
        "PX",
        "REG",
        "RESP",
        "RF",
        "RG",
        "RTDOSE",
        "RTIMAGE",
        "RTPLAN",
        "RTRECORD",
        "RTSTRUCT",
        "RWV",
        "SEG",
        "SM",
        "SMR",
        "SR",
        "SRF",
        "STAIN",
        "TEXTUREMAP",
        "TG",
        "US",
        "VA",
        "XA",
        "XC",
    }
)


#: Body Part Examined defined terms (PS3.16 CID 4031 and PS3.16 Annex L's common CT values) a
#: skip reason may quote; anything else is not quoted (free text from a damaged header).
_BODY_PARTS = frozenset(
    {
        "ABDOMEN",
        "ABDOMENPELVIS",
        "ADRENAL",
        "ANKLE",
        "AORTA",
        "ARM",
        "BRAIN",
        "BREAST",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CSPINE",
        "ELBOW",
        "EXTREMITY",
        "FOOT",
        "HAND",
        "HEAD",
        "HEADNECK",
        "HEART",
        "HIP",
        "JAW",
        "KIDNEY",
        "KNEE",
        "LEG",
        "LIVER",
        "LSPINE",
        "LUNG",
        "NECK",
        "PANCREAS",
        "PELVIS",
        "SHOULDER",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "THORAX",
        "TSPINE",
        "WHOLEBODY",
        "WRIST",
    }
)


def _shown_body_part(value: str) -> str:
    """``value`` if it is a known Body Part Examined term; else words that quote nothing of it."""
    value = value.strip().upper()
    if not value:
        return "missing"
    return value if value in _BODY_PARTS else "not a defined term"


def _shown_modality(value: str) -> str:
    """``value`` if it is a Modality defined term; else words that quote nothing of it."""
    if not value:
        return "missing"
    return value if value in _MODALITIES else "not a defined term"


@dataclass(frozen=True)
class SelectionRules:
    """Series selection.

    Attributes:
        modality: required Modality (``""``: any).
        image_type: values ImageType must contain (e.g. ORIGINAL, PRIMARY, AXIAL).
        min_slices: fewest slices (frames).
        max_thickness_mm: thickest slices accepted; a series without SliceThickness passes.
        orientation: required slice orientation from the index (``""``: any).
        body_part: BodyPartExamined must be one of these (upper case, e.g. ``CHEST`` or
            ``ABDOMEN``/``ABDOMENPELVIS``); empty: any, a series without the tag included. This
            is how the gateway routes chest CT to a nodule detector and abdominal CT to an organ
            model. A series without BodyPartExamined fails a non-empty rule: an unlabeled body
            part is not guessed from free text.
        per_study: ``"all"`` eligible series, or ``"thinnest"`` one per study (thinnest
            slices, then most slices, then lowest SeriesInstanceUID).

    Only DICOM series carry these headers; volume files (LUNA16, Decathlon, NIfTI lists)
    are always eligible.
    """

    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    min_slices: int = 32
    max_thickness_mm: float = 2.5
    orientation: str = "AXIAL"
    body_part: tuple[str, ...] = ()
    per_study: str = "all"

    def __post_init__(self) -> None:
        if self.per_study not in ("all", "thinnest"):
            raise ConfigError(
                f"per_study must be 'all' or 'thinnest', got {self.per_study!r}", key="per_study"
            )
        object.__setattr__(self, "body_part", tuple(str(v).strip().upper() for v in self.body_part))
        if self.min_slices < 1 or self.max_thickness_mm <= 0:
            raise ConfigError("min_slices must be >= 1 and max_thickness_mm > 0")

    def reason_to_skip(self, item: ScanItem) -> str | None:
        """Why ``item`` is not scored under these rules, or None when it is eligible."""
        if not item.is_dicom:
            return None
        values = [v.strip().upper() for v in item.image_type.split("\\")]
        if "LOCALIZER" in values:
            return "localizer (scout) series"
        if self.modality and item.modality != self.modality:
            return f"modality {_shown_modality(item.modality)}, not {self.modality}"
        if self.body_part and item.body_part.strip().upper() not in self.body_part:
            return f"body part {_shown_body_part(item.body_part)}, not {'/'.join(self.body_part)}"
        missing = [v for v in self.image_type if v not in values]
        if missing:  # the value itself is not quoted: a damaged header may hold anything (PHI)
            lacks = "lacks" if item.image_type else "missing, so lacks"
            return f"image type {lacks} {'/'.join(missing)}"
        if self.orientation and item.orientation != self.orientation:
            return f"{item.orientation.lower() or 'unknown'} slices, not {self.orientation.lower()}"
        if item.n_slices is not None and item.n_slices < self.min_slices:
            return f"{item.n_slices} slices, fewer than {self.min_slices}"
        if item.slice_thickness_mm is not None and item.slice_thickness_mm > self.max_thickness_mm:
            return (
                f"{item.slice_thickness_mm:g} mm slices, thicker than {self.max_thickness_mm:g} mm"
            )
        return None


@dataclass(frozen=True)
class Skip:
    """A series not scored, and the reason."""

    item: ScanItem
    reason: str


def select_series(
    items: Sequence[ScanItem], rules: SelectionRules
) -> tuple[list[ScanItem], list[Skip]]:
    """Split ``items`` into those to score (input order kept) and those skipped, with reasons."""
    chosen, skipped = [], []
    for item in items:
        reason = rules.reason_to_skip(item)
        if reason is None:
            chosen.append(item)
        else:
            skipped.append(Skip(item, reason))
    if rules.per_study == "thinnest":
        best: dict[str, ScanItem] = {}
        for item in chosen:
            study = item.study_uid or item.key
            if study not in best or _thinner(item, best[study]):
                best[study] = item
        keep = {id(item) for item in best.values()}
        for item in chosen:
            if id(item) not in keep:
                winner = best[item.study_uid or item.key]
                skipped.append(
                    Skip(item, f"not the thinnest series of its study ({winner.key} is)")
                )
        chosen = [item for item in chosen if id(item) in keep]
    return chosen, skipped


def _thinner(a: ScanItem, b: ScanItem) -> bool:
    def rank(item: ScanItem) -> tuple[float, int, str]:
        thickness = item.slice_thickness_mm if item.slice_thickness_mm is not None else float("inf")
        return (thickness, -(item.n_slices or 0), item.key)

    return rank(a) < rank(b)


def parse_rules(text: str | None, base: SelectionRules | None = None) -> SelectionRules:
    """Rules from a YAML/JSON file path, or ``key=value[,key=value...]``; None → ``base``.

    The keys given replace those of ``base`` (default :class:`SelectionRules`'s defaults; for
    ``medssl-score``, the model card's ``selection``). ``image_type`` and ``body_part`` take
    values joined by ``/`` (``ORIGINAL/PRIMARY``, ``ABDOMEN/ABDOMENPELVIS``) in the pair form.

    Raises:
        ConfigError: unreadable file, unknown key (named, with the known ones), bad value.
    """
    if not text:
        return base or SelectionRules()
    path = Path(text)
    if path.is_file():
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the selection rules ({exc})") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: selection rules must be a mapping of key: value")
    else:
        data = {}
        for pair in text.split(","):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(
                    f"--select {text!r}: expected a rules file or key=value pairs", key="--select"
                )
            data[key.strip()] = value.strip()
    return rules_from_mapping(data, base)


def rules_from_mapping(
    data: Mapping[str, Any], base: SelectionRules | None = None
) -> SelectionRules:
    """Rules from ``{key: value}`` (the form of a rules file, a gateway route's ``select`` and a
    model card's ``selection``); the keys given replace those of ``base`` (default: the
    defaults).

    Raises:
        ConfigError: unknown key (named, with the known ones), bad value.
    """
    known = {f.name: f for f in fields(SelectionRules)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown selection rule(s) {unknown}; known: {sorted(known)}", key=unknown[0]
        )
    rules = base or SelectionRules()
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            if key in ("image_type", "body_part"):
                items = value.split("/") if isinstance(value, str) else list(value or [])
                values[key] = tuple(str(v).strip().upper() for v in items if str(v).strip())
            elif key == "min_slices":
                values[key] = int(value)
            elif key == "max_thickness_mm":
                values[key] = float(value)
            else:
                values[key] = (
                    str(value).upper() if key in ("modality", "orientation") else str(value)
                )
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"selection rule {key}: bad value {value!r} ({exc})", key=key
            ) from exc
    return replace(rules, **values)


def rules_to_mapping(rules: SelectionRules) -> dict[str, Any]:
    """The rules that differ from the defaults, as JSON values (what a model card's
    ``selection`` holds); :func:`rules_from_mapping` reads it back to ``rules``."""
    default = SelectionRules()
    return {
        f.name: list(value) if isinstance(value, tuple) else value
        for f in fields(SelectionRules)
        if (value := getattr(rules, f.name)) != getattr(default, f.name)
    }
