"""A Triton model repository on disk: models, version folders, and a whole-repository check.

Layout (Triton's, plus medssl's card)::

    repository/<name>/config.pbtxt      Triton model configuration
    repository/<name>/medssl.json       the card of the newest version
    repository/<name>/<version>/        positive integers; model.onnx | model.plan | model.py
    repository/<name>/<version>/medssl.json   that version's card
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.errors import ModelCardError, ModelRepositoryError
from medssl.models.card import CARD_FILE, ModelCard, load_card
from medssl.models.graph import graph_problems
from medssl.models.triton_config import CONFIG_FILE, Backend, read_config

__all__ = [
    "ModelReport",
    "ModelVersion",
    "check_model",
    "check_repository",
    "find_model_version",
    "latest_version",
    "list_models",
    "next_version",
    "versions",
]


def versions(model_dir: str | Path) -> list[int]:
    """The numbered version folders of a model, ascending (none → ``[]``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def next_version(model_dir: str | Path) -> int:
    """The first free version number: one past the newest (1 for a new model)."""
    return max(versions(model_dir), default=0) + 1


def latest_version(model_dir: str | Path) -> int:
    """The newest version of a model.

    Raises:
        ModelRepositoryError: the folder does not exist or holds no version.
    """
    found = versions(model_dir)
    if not found:
        raise ModelRepositoryError(
            model_dir, "no numbered version folder; export a model into it with medssl-export"
        )
    return found[-1]


def list_models(repository: str | Path) -> list[str]:
    """Names of the model folders of a repository (folders holding ``config.pbtxt`` or a card).

    Raises:
        ModelRepositoryError: ``repository`` is not a folder.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise ModelRepositoryError(repository, "model repository folder does not exist")
    return sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and ((p / CONFIG_FILE).exists() or (p / CARD_FILE).exists())
    )


@dataclass
class ModelReport:
    """What :func:`check_model` found about one model.

    Attributes:
        name: the model folder's name.
        versions: its version numbers.
        problems: what is wrong (each names the file and the fault); empty when the model is
            servable.
        notes: what was not checked, and why (e.g. a TensorRT plan on a machine without GPU).
    """

    name: str
    versions: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
        }


def _backend(config: Any) -> Backend | None:
    if config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        return Backend.ONNXRUNTIME
    if config.platform == "tensorrt_plan" or config.backend == "tensorrt":
        return Backend.TENSORRT
    if config.backend == "python":
        return Backend.PYTHON
    return None


def _config_problems(config: Any, card: ModelCard) -> list[str]:
    """Where ``config.pbtxt`` disagrees with the card."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    if config.name and config.name != card.name:
        problems.append(f"{CONFIG_FILE} name {config.name!r} differs from the card's {card.name!r}")
    if config.max_batch_size != card.max_batch_size:
        problems.append(
            f"{CONFIG_FILE} max_batch_size {config.max_batch_size} differs from the "
            f"card's {card.max_batch_size}"
        )
    declared = {
        t.name: (pb.DataType.Name(t.data_type).removeprefix("TYPE_"), tuple(t.dims))
        for t in [*config.input, *config.output]
    }
    for spec in (card.input, *card.outputs):
        if spec.name not in declared:
            problems.append(f"{CONFIG_FILE} lacks tensor {spec.name!r} of the card")
        elif declared[spec.name] != (spec.datatype, spec.shape):
            problems.append(
                f"{CONFIG_FILE} declares {spec.name!r} as {declared[spec.name]}, the card "
                f"{(spec.datatype, spec.shape)}"
            )
    extra = set(declared) - {card.input.name, *card.output_names}
    if extra:
        problems.append(f"{CONFIG_FILE} declares tensors {sorted(extra)} the card does not know")
    return problems


def _onnx_problems(path: Path, card: ModelCard) -> list[str]:
    """Load ``model.onnx`` in onnxruntime (CPU) and compare its tensors with the card."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        return [f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})"]
    return [f"{path}: {problem}" for problem in graph_problems(session, card)]


def check_model(model_dir: str | Path) -> ModelReport:
    """Check one model folder: config, cards, and every version's model file.

    Checks that ``config.pbtxt`` parses into Triton's ``ModelConfig``; that the card loads
    and matches the config (name, tensors, dtypes, dims, ``max_batch_size``); that every
    version folder holds the backend's model file and, for ONNX, that onnxruntime loads it
    and its inputs and outputs match the card; that each version card (when present) names
    its version; and that the top-level card describes the newest version.
    """
    model_dir = Path(model_dir)
    report = ModelReport(model_dir.name, versions(model_dir))
    try:
        config = read_config(model_dir)
    except ModelRepositoryError as exc:
        report.problems.append(str(exc))
        config = None
    try:
        card = load_card(model_dir)
    except ModelCardError as exc:
        report.problems.append(str(exc))
        return report
    if card.name != model_dir.name:
        report.problems.append(
            f"{model_dir / CARD_FILE}: card name {card.name!r} differs from the "
            f"folder name {model_dir.name!r}"
        )
    if not report.versions:
        report.problems.append(f"{model_dir}: no numbered version folder")
        return report
    if card.version != report.versions[-1]:
        report.problems.append(
            f"{model_dir / CARD_FILE}: describes version {card.version}, the "
            f"newest is {report.versions[-1]}"
        )
    backend = None
    if config is not None:
        report.problems += [
            f"{model_dir / CONFIG_FILE}: {p}" for p in _config_problems(config, card)
        ]
        backend = _backend(config)
        if backend is None:
            report.problems.append(
                f"{model_dir / CONFIG_FILE}: platform {config.platform!r} / backend "
                f"{config.backend!r} is not one medssl writes"
            )
    for version in report.versions:
        folder = model_dir / str(version)
        version_card = card
        if (folder / CARD_FILE).exists():
            try:
                version_card = load_card(folder)
            except ModelCardError as exc:
                report.problems.append(str(exc))
                continue
            if version_card.version != version:
                report.problems.append(f"{folder / CARD_FILE}: says version {version_card.version}")
        if backend is None:
            continue
        model_file = folder / backend.model_file
        if not model_file.is_file():
            report.problems.append(f"{folder}: no {backend.model_file} for backend {backend.value}")
        elif backend is Backend.ONNXRUNTIME:
            report.problems += _onnx_problems(model_file, version_card)
        elif backend is Backend.PYTHON:
            onnx_file = folder / Backend.ONNXRUNTIME.model_file
            if onnx_file.is_file():
                report.problems += _onnx_problems(onnx_file, version_card)
        else:
            report.notes.append(
                f"{model_file}: TensorRT plans are checked by loading them on a GPU; "
                f"not loaded here"
            )
    return report


def check_repository(repository: str | Path) -> list[ModelReport]:
    """:func:`check_model` for every model of a repository.

    Raises:
        ModelRepositoryError: the folder does not exist or holds no model.
    """
    names = list_models(repository)
    if not names:
        raise ModelRepositoryError(repository, "holds no model folder (a folder with config.pbtxt)")
    return [check_model(Path(repository) / name) for name in names]


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model in a repository.

    Attributes:
        model_dir: ``<repository>/<name>``.
        version: the numbered version folder.
        card: the version folder's card, else the model folder's.
    """

    model_dir: Path
    version: int
    card: ModelCard

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)


def find_model_version(
    repository: str | Path, name: str, version: int | None = None
) -> ModelVersion:
    """Locate ``<repository>/<name>/<version>`` and read its card.

    Args:
        repository: the model repository folder.
        name: the model's folder name.
        version: a numbered version folder; ``None``: the highest number.

    Raises:
        ModelRepositoryError: no such repository, model or version (the error lists what
            exists).
        ModelCardError: neither the version folder nor the model folder has a readable card.
    """
    repository = Path(repository)
    models = list_models(repository)
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ModelRepositoryError(
            model_dir, f"no model {name!r}; the repository holds {models or 'no models'}"
        )
    if version is None:
        version = latest_version(model_dir)
    elif version not in (present := versions(model_dir)):
        raise ModelRepositoryError(
            model_dir / str(version),
            f"no version {version} of model {name!r}; versions present: {present or 'none'}",
        )
    version_dir = model_dir / str(version)
    card = load_card(version_dir if (version_dir / CARD_FILE).is_file() else model_dir)
    return ModelVersion(model_dir, version, card)
