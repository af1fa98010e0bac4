"""Find a model version and its card in a Triton model repository (read side, torch-free).

Layout (see ``model_repository/README.md``)::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/medssl.json          card of the newest version
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/medssl.json  card of this version (optional)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medssl.errors import ModelRepositoryError
from medssl.models.card import CARD_FILE, ModelCard, load_card

__all__ = ["ModelVersion", "find_model_version"]


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
            exists), or no card.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise ModelRepositoryError(repository, "no such model repository folder")
    model_dir = repository / name
    if not model_dir.is_dir():
        models = sorted(p.name for p in repository.iterdir() if p.is_dir())
        raise ModelRepositoryError(
            model_dir, f"no model {name!r}; the repository holds {models or 'no models'}"
        )
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if version is None:
        if not versions:
            raise ModelRepositoryError(
                model_dir, "no numbered version folders; export the model with medssl-export"
            )
        version = versions[-1]
    elif version not in versions:
        raise ModelRepositoryError(
            model_dir / str(version),
            f"no version {version} of model {name!r}; versions present: {versions or 'none'}",
        )
    version_dir = model_dir / str(version)
    card = load_card(version_dir if (version_dir / CARD_FILE).is_file() else model_dir)
    return ModelVersion(model_dir, version, card)
