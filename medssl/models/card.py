"""The medssl model card, ``medssl.json``: everything serving needs to run an exported model.

A card sits next to Triton's ``config.pbtxt`` in ``model_repository/<name>/`` (the newest
version) and in each version folder (that version). Triton ignores it; the runners, the
scoring CLI and the gateway read it to prepare inputs, decode outputs and code the results.

Coordinates follow medssl's conventions: arrays ``(z, y, x)``, world points LPS in mm.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from medssl.atomic import atomic_write
from medssl.errors import ConfigError, ModelCardError
from medssl.metrics.calibration import Calibration
from medssl.metrics.operating_point import OperatingPoint
from medssl.pipeline.detect import DetectionParams
from medssl.pipeline.preprocess import Intensity, PercentileIntensity, normalisation_from_json
from medssl.pipeline.segment import SegmentationParams

if TYPE_CHECKING:
    from medssl.scoring.select import SelectionRules

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "LEGACY_REPORT_THRESHOLD",
    "LUNG",
    "NODULE",
    "NODULE_LABEL",
    "Code",
    "Decoding",
    "Label",
    "ModelCard",
    "ReportThreshold",
    "Task",
    "TensorSpec",
    "load_card",
    "warn_without_operating_point",
]

log = logging.getLogger("medssl.models.card")

CARD_FILE = "medssl.json"
CARD_FORMAT = "medssl.model-card/1"
#: Triton data types a card may name (``TYPE_`` prefix dropped, as in Triton's model metadata).
DATATYPES = ("FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL")
#: What a detector card without an ``operating_point`` reports from (the threshold used before
#: cards carried one).
LEGACY_REPORT_THRESHOLD = 0.5


class Task(str, Enum):
    """What a model computes."""

    DETECTION = "detection"
    SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM code sequence item), e.g. ``Code("27925004", "SCT", "Nodule")``."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(
                    f"Code.{name} must be a non-empty string, got {getattr(self, name)!r}"
                )

    def to_json(self) -> dict[str, str]:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


#: SNOMED CT concepts used by the shipped models (the codes DICOM SR and SEG readers expect).
NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")


@dataclass(frozen=True)
class Label:
    """One output class and its codes (DICOM SEG segment / TID 1500 finding).

    Attributes:
        value: the class index in the model output (detection: 1, the one foreground class).
        name: a short human name.
        category: property category (e.g. Morphologically abnormal structure).
        type: property type (e.g. Nodule, SCT 27925004).
        anatomic_region: where it is found (e.g. Lung, SCT 39607008), optional.
        colour: recommended display colour, RGB 0..255 (a SEG segment's display colour).
    """

    value: int
    name: str
    category: Code
    type: Code
    anatomic_region: Code | None = None
    colour: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.colour is not None and (
            len(self.colour) != 3 or any(not 0 <= int(c) <= 255 for c in self.colour)
        ):
            raise ValueError(
                f"label {self.name!r}: colour must be three RGB values 0..255, got {self.colour}"
            )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "value": self.value,
            "name": self.name,
            "category": self.category.to_json(),
            "type": self.type.to_json(),
        }
        if self.anatomic_region is not None:
            data["anatomic_region"] = self.anatomic_region.to_json()
        if self.colour is not None:
            data["colour"] = [int(c) for c in self.colour]
        return data


#: The label of every medssl nodule detector.
NODULE_LABEL = Label(1, "Nodule", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NODULE, LUNG)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as Triton sees it.

    Attributes:
        name: tensor name in the graph and in ``config.pbtxt``.
        datatype: Triton data type without ``TYPE_`` (``FP32``...).
        shape: dims after the batch axis (the batch axis is dynamic, up to ``max_batch_size``).
        description: what it holds, with units and frame.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorSpec.name must be non-empty")
        if self.datatype not in DATATYPES:
            raise ValueError(
                f"TensorSpec {self.name!r}: datatype {self.datatype!r} is not one of {DATATYPES}"
            )
        if any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: shape {self.shape} must be positive ints")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "description": self.description,
        }


@dataclass(frozen=True)
class Decoding:
    """How detection outputs become findings (the detection part of the card).

    The network already decodes anchors into boxes (``boxes (B, N, 4)`` as ``(z, y, x, d)``
    in patch voxels, ``scores (B, N)`` probabilities); these are the shared pipeline's
    filtering and 3D NMS parameters, and the anchor layout for reference.

    Attributes:
        divisor: the network's largest stride; windows are multiples of it.
        score_threshold, pre_nms_top_k, nms_iou, max_detections, min_diameter_mm:
            see :class:`medssl.pipeline.detect.DetectionParams`.
        anchor_strides: feature strides (voxels) of the anchor levels.
        anchor_sizes: cube edge (voxels) of each level's anchors.
        lung_mask, lung_margin_mm: restrict detection to the lungs (and the mask's dilation,
            mm), see :class:`medssl.pipeline.detect.DetectionParams`; off in older cards.
        calibration: the monotone map from the network's scores to the probabilities the
            pipeline reports (:class:`~medssl.metrics.calibration.Calibration`, fitted on the
            run's validation marks; the identity for a card without one). The operating
            point is chosen on these calibrated probabilities.
    """

    divisor: int
    score_threshold: float = 0.01
    pre_nms_top_k: int = 1000
    nms_iou: float = 0.1
    max_detections: int = 100
    min_diameter_mm: float = 0.0
    anchor_strides: tuple[int, ...] = ()
    anchor_sizes: tuple[float, ...] = ()
    lung_mask: bool = False
    lung_margin_mm: float = 5.0
    calibration: Calibration = field(default_factory=Calibration)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["anchor_strides"] = list(self.anchor_strides)
        data["anchor_sizes"] = list(self.anchor_sizes)
        data["calibration"] = self.calibration.to_json()
        return data


@dataclass(frozen=True)
class ModelCard:
    """``medssl.json``: a model's serving contract and provenance.

    Attributes:
        name: the model's name in the repository.
        version: the Triton version folder this card describes.
        task: detection or segmentation.
        input: the single input tensor, ``(1, Z, Y, X)`` after the batch axis.
        outputs: the output tensors, in the order runners return them.
        max_batch_size: largest batch the model accepts.
        input_spacing: voxel size ``(z, y, x)`` in mm the model expects.
        normalisation: HU window mapped to ``[-1, 1]``, and the padding value.
        overlap: recommended sliding-window overlap, fraction of a window edge.
        labels: the output classes with their SNOMED CT codes.
        decoding: detection post-processing; ``None`` for segmentation.
        operating_point: detection: the reporting threshold chosen on validation and the
            rule that chose it (:class:`~medssl.metrics.operating_point.OperatingPoint`);
            DICOM outputs hold the findings at or above it. None: a card written before
            cards carried one (reports from :data:`LEGACY_REPORT_THRESHOLD`, with a warning).
        precision: ``fp32`` or ``fp16`` weights of the exported graph.
        intended_use: a plain statement of what the model is (and is not) for.
        selection: the series the model is meant for, as ``medssl-score --select`` rules that
            differ from the defaults (:func:`medssl.scoring.select.rules_to_mapping`), e.g.
            ``{"min_slices": 16, "max_thickness_mm": 5.0}`` for a segmenter trained on
            2.5-5 mm abdominal CT. ``medssl-score`` starts from them (``--select`` overrides
            key by key); empty: the defaults, thin-slice axial CT. A gateway route states its
            own ``select``.
        provenance: method, data, labeled/unlabeled counts, metrics, code version, export
            time, parity error, source checkpoint (free-form JSON).
    """

    name: str
    version: int
    task: Task
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    input_spacing: tuple[float, float, float]
    normalisation: Intensity | PercentileIntensity
    overlap: float
    labels: tuple[Label, ...]
    decoding: Decoding | None = None
    operating_point: OperatingPoint | None = None
    precision: str = "fp32"
    intended_use: str = "Research use only; not for clinical use."
    selection: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))
        object.__setattr__(self, "selection", dict(self.selection))
        problems = _problems(self)
        if problems:
            raise ValueError(f"model card {self.name!r}: " + "; ".join(problems))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Sliding-window patch ``(z, y, x)`` in voxels (the input shape after the channel)."""
        return tuple(self.input.shape[1:])  # type: ignore[return-value]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def detection_params(self, batch_size: int = 2) -> DetectionParams:
        """The shared pipeline's parameters for this detector.

        Raises:
            ValueError: the card is not a detection card, its patch is not a cube, or its
                normalisation is not an HU window (the detector's lung mask reads HU).
        """
        if self.task is not Task.DETECTION or self.decoding is None:
            raise ValueError(f"model {self.name!r} is a {self.task.value} model, not a detector")
        z, y, x = self.patch_size
        spacing = set(self.input_spacing)
        if not z == y == x or len(spacing) != 1:
            raise ValueError(
                f"model {self.name!r}: detection needs a cubic patch and isotropic "
                f"spacing, got patch {self.patch_size}, spacing {self.input_spacing}"
            )
        if not isinstance(self.normalisation, Intensity):
            raise ValueError(
                f"model {self.name!r}: detection needs an HU-window normalisation "
                f"(kind 'hu_window'), got {self.normalisation.to_json().get('kind')!r}"
            )
        d = self.decoding
        return DetectionParams(
            spacing_mm=float(self.input_spacing[0]),
            normalisation=self.normalisation,
            window=self.patch_size,
            divisor=d.divisor,
            overlap=self.overlap,
            batch_size=batch_size,
            score_threshold=d.score_threshold,
            pre_nms_top_k=d.pre_nms_top_k,
            nms_iou=d.nms_iou,
            max_detections=d.max_detections,
            min_diameter_mm=d.min_diameter_mm,
            lung_mask=d.lung_mask,
            lung_margin_mm=d.lung_margin_mm,
            calibration=d.calibration,
        )

    def report_threshold(self, override: float | None = None) -> ReportThreshold:
        """The probability from which a detector's findings are reported (SR, SEG, the
        ``passed`` column of ``findings.parquet``), and where it comes from.

        Args:
            override: a threshold the user set (``--sr-threshold``, a route's
                ``min_probability``); None takes the card's operating point, or
                :data:`LEGACY_REPORT_THRESHOLD` for a card without one.

        Raises:
            ValueError: ``override`` outside [0, 1], or the card is not a detector's.
        """
        if self.task is not Task.DETECTION:
            raise ValueError(
                f"model {self.name!r} is a {self.task.value} model: it has no report threshold"
            )
        if override is not None:
            if not 0.0 <= float(override) <= 1.0:
                raise ValueError(
                    f"a report threshold must be a probability in [0, 1], got {override}"
                )
            return ReportThreshold(float(override), "override")
        if self.operating_point is not None:
            return ReportThreshold(float(self.operating_point.threshold), "operating_point")
        return ReportThreshold(LEGACY_REPORT_THRESHOLD, "legacy_default")

    def segmentation_params(self, batch_size: int = 2) -> SegmentationParams:
        """The shared pipeline's parameters for this segmenter (Gaussian blending).

        Raises:
            ValueError: the card is not a segmentation card.
        """
        if self.task is not Task.SEGMENTATION:
            raise ValueError(f"model {self.name!r} is a {self.task.value} model, not a segmenter")
        return SegmentationParams(
            spacing_mm=self.input_spacing,
            normalisation=self.normalisation,
            window=self.patch_size,
            n_classes=len(self.labels) + 1,
            overlap=self.overlap,
            batch_size=batch_size,
        )

    def to_json(self) -> dict[str, Any]:
        """The card as a JSON object (key order as written to ``medssl.json``)."""
        return {
            "format": CARD_FORMAT,
            "name": self.name,
            "version": self.version,
            "task": self.task.value,
            "intended_use": self.intended_use,
            "input": self.input.to_json(),
            "outputs": [o.to_json() for o in self.outputs],
            "max_batch_size": self.max_batch_size,
            "input_spacing": list(self.input_spacing),
            "patch_size": list(self.patch_size),
            "normalisation": {**self.normalisation.to_json(), "output_range": [-1.0, 1.0]},
            "overlap": self.overlap,
            "decoding": self.decoding.to_json() if self.decoding else None,
            "operating_point": self.operating_point.to_json() if self.operating_point else None,
            "labels": [label.to_json() for label in self.labels],
            "precision": self.precision,
            "selection": dict(self.selection),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelCard:
        """Parse a card; the error names the bad key.

        Raises:
            ValueError: wrong format tag, missing or unknown keys, or invalid values.
        """
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"'format' must be {CARD_FORMAT!r}, got {data.get('format')!r}")
        body = {k: v for k, v in data.items() if k != "format"}
        known = {f.name for f in fields(cls)} | {"patch_size"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        required = {
            "name",
            "version",
            "task",
            "input",
            "outputs",
            "max_batch_size",
            "input_spacing",
            "normalisation",
            "overlap",
            "labels",
        }
        missing = sorted(required - set(body))
        if missing:
            raise ValueError(f"missing keys {missing}")
        with _naming("input"):
            tensor_in = _tensor(body["input"])
        if "patch_size" in body and list(body["patch_size"]) != list(tensor_in.shape[1:]):
            raise ValueError(
                f"'patch_size' {body['patch_size']} disagrees with input shape {tensor_in.shape}"
            )
        with _naming("outputs"):
            outputs = tuple(_tensor(o) for o in body["outputs"])
        with _naming("normalisation"):
            intensity = normalisation_from_json(body["normalisation"])
        with _naming("labels"):
            labels = tuple(_label(item) for item in body["labels"])
        decoding = None
        if body.get("decoding") is not None:
            with _naming("decoding"):
                dec = dict(body["decoding"])
                dec["anchor_strides"] = tuple(dec.get("anchor_strides", ()))
                dec["anchor_sizes"] = tuple(float(s) for s in dec.get("anchor_sizes", ()))
                if dec.get("calibration") is not None:
                    with _naming("calibration"):
                        dec["calibration"] = Calibration.from_json(dec["calibration"])
                else:
                    dec.pop("calibration", None)
                decoding = Decoding(**dec)
        operating_point = None
        if body.get("operating_point") is not None:
            with _naming("operating_point"):
                operating_point = OperatingPoint.from_json(body["operating_point"])
        with _naming("card"):
            return cls(
                name=body["name"],
                version=int(body["version"]),
                task=body["task"],
                input=tensor_in,
                outputs=outputs,
                max_batch_size=int(body["max_batch_size"]),
                input_spacing=tuple(float(s) for s in body["input_spacing"]),  # type: ignore[arg-type]
                normalisation=intensity,
                overlap=float(body["overlap"]),
                labels=labels,
                decoding=decoding,
                operating_point=operating_point,
                precision=body.get("precision", "fp32"),
                intended_use=body.get("intended_use", cls.intended_use),
                selection=dict(body.get("selection") or {}),
                provenance=dict(body.get("provenance") or {}),
            )

    def selection_rules(self) -> SelectionRules:
        """The series this model is meant for: the defaults with the card's ``selection``."""
        from medssl.scoring.select import rules_from_mapping  # medssl.scoring imports this module

        return rules_from_mapping(self.selection)

    def save(self, path: str | Path) -> Path:
        """Write the card as JSON (atomically); returns the path."""
        path = Path(path)
        text = (json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n").encode("utf-8")
        atomic_write(path, lambda fh: fh.write(text))
        return path


class ReportThreshold(NamedTuple):
    """A detector's reporting threshold (:meth:`ModelCard.report_threshold`).

    Attributes:
        value: findings with ``probability >= value`` are reported, in [0, 1].
        source: ``"override"`` (the user's setting), ``"operating_point"`` (the card's, chosen
            on validation) or ``"legacy_default"`` (a card without an operating point:
            :data:`LEGACY_REPORT_THRESHOLD`).
    """

    value: float
    source: str


def warn_without_operating_point(card: ModelCard, override: float | None = None) -> bool:
    """Log one warning (``medssl.models.card``) when detector ``card`` has no operating point,
    naming the model and the threshold used instead; call it once per model load.

    Returns:
        True when it warned.
    """
    if card.task is not Task.DETECTION or card.operating_point is not None:
        return False
    used = card.report_threshold(override)
    instead = (
        f"the threshold set for it ({used.value:g})"
        if used.source == "override"
        else f"{used.value:g}, as before cards carried one"
    )
    log.warning(
        "model %s v%d: its card has no operating point (exported before medssl chose one on "
        "validation); reporting findings with probability >= %s. Re-export it with medssl-export "
        "to record one.",
        card.name,
        card.version,
        instead,
    )
    return True


def load_card(path: str | Path) -> ModelCard:
    """Read ``medssl.json`` (or the folder holding it).

    Raises:
        ModelCardError: the file is missing, not JSON, or not a valid card (the bad key named).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise ModelCardError(path, "no model card; export the model with medssl-export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelCardError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ModelCardError(path, f"expected a JSON object, found {type(data).__name__}")
    try:
        return ModelCard.from_json(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelCardError(path, str(exc)) from exc


# -- parsing helpers ---------------------------------------------------------------------------


class _naming:
    """Context manager prefixing a ValueError/TypeError/KeyError with the key being parsed."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
            raise ValueError(f"{self.key!r}: {exc}") from exc


def _tensor(data: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        data["name"],
        data["datatype"],
        tuple(int(d) for d in data["shape"]),
        data.get("description", ""),
    )


def _code(data: Mapping[str, Any]) -> Code:
    return Code(str(data["value"]), str(data["scheme"]), str(data["meaning"]))


def _colour(values: Sequence[Any]) -> tuple[int, int, int]:
    """A label's display colour: three integers (R, G, B)."""
    r, g, b = (int(c) for c in values)
    return r, g, b


def _label(data: Mapping[str, Any]) -> Label:
    region, colour = data.get("anatomic_region"), data.get("colour")
    return Label(
        int(data["value"]),
        str(data["name"]),
        _code(data["category"]),
        _code(data["type"]),
        _code(region) if region else None,
        _colour(colour) if colour else None,
    )


def _problems(card: ModelCard) -> list[str]:
    """Everything wrong with a card, as messages naming the key."""
    problems = []
    if not card.name or "/" in card.name:
        problems.append(f"name {card.name!r} must be a non-empty folder name")
    if card.version < 1:
        problems.append(f"version must be >= 1, got {card.version}")
    if len(card.input.shape) != 4 or card.input.shape[0] != 1:
        problems.append(
            f"input shape must be (1, Z, Y, X) after the batch axis, got {card.input.shape}"
        )
    if not card.outputs:
        problems.append("outputs must name at least one tensor")
    if len({o.name for o in card.outputs} | {card.input.name}) != len(card.outputs) + 1:
        problems.append("input and output names must be distinct")
    if card.max_batch_size < 1:
        problems.append(f"max_batch_size must be >= 1, got {card.max_batch_size}")
    if len(card.input_spacing) != 3 or not all(
        math.isfinite(s) and s > 0 for s in card.input_spacing
    ):
        problems.append(f"input_spacing must be 3 positive mm values, got {card.input_spacing}")
    if not 0.0 <= card.overlap < 1.0:
        problems.append(f"overlap must be in [0, 1), got {card.overlap}")
    try:
        card.selection_rules()
    except ConfigError as exc:
        problems.append(f"selection: {exc}")
    if card.precision not in ("fp32", "fp16"):
        problems.append(f"precision must be 'fp32' or 'fp16', got {card.precision!r}")
    if not card.labels:
        problems.append("labels must list every output class with its codes")
    values = [label.value for label in card.labels]
    if len(set(values)) != len(values) or min(values, default=1) < 1:
        problems.append(f"label values must be distinct and >= 1, got {values}")
    if card.task is Task.DETECTION:
        if card.decoding is None:
            problems.append("a detection card needs 'decoding'")
        if card.output_names != ("boxes", "scores"):
            problems.append(
                f"detection outputs must be ('boxes', 'scores'), got {card.output_names}"
            )
    else:
        if card.decoding is not None:
            problems.append("'decoding' is for detection cards only")
        if card.operating_point is not None:
            problems.append("'operating_point' is for detection cards only")
        shape = card.outputs[0].shape if len(card.outputs) == 1 else ()
        if (
            len(shape) != 4
            or shape[0] != len(card.labels) + 1
            or tuple(shape[1:]) != tuple(card.input.shape[1:])
        ):
            problems.append(
                f"a segmentation card has one output (C, Z, Y, X) with C = {len(card.labels) + 1} "
                f"(background + labels) and the input's patch, got "
                f"{[o.shape for o in card.outputs]} for input {card.input.shape}"
            )
        if values and sorted(values) != list(range(1, len(values) + 1)):
            problems.append(
                f"segmentation label values must be 1..{len(values)} (output channels), "
                f"got {values}"
            )
    return problems
