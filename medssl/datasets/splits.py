"""Reproducible labeled / unlabeled / validation splits, stored as JSON.

A split is a pure function of the case ids, the counts and the seed; the JSON
file records all of them, so a run can be repeated and audited.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medssl.errors import MedsslError

__all__ = ["Split", "make_split", "read_split", "write_split"]


@dataclass(frozen=True)
class Split:
    """Which cases are labeled, unlabeled, and held out for validation."""

    seed: int
    n_labeled: int
    n_validation: int
    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]


def make_split(case_ids: Sequence[str], n_labeled: int, seed: int, n_validation: int = 0) -> Split:
    """Shuffle ``case_ids`` (sorted first, so input order does not matter) with ``seed``.

    The first ``n_validation`` shuffled ids are validation, the next ``n_labeled``
    labeled, and the rest unlabeled (their labels, if any, are not to be used).

    Raises:
        MedsslError: counts larger than the number of cases, or duplicate ids.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise MedsslError("case ids must be unique to split them")
    if n_labeled < 0 or n_validation < 0 or n_labeled + n_validation > len(ids):
        raise MedsslError(
            f"cannot take {n_labeled} labeled + {n_validation} validation cases from {len(ids)}"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    validation = sorted(shuffled[:n_validation])
    labeled = sorted(shuffled[n_validation : n_validation + n_labeled])
    unlabeled = sorted(shuffled[n_validation + n_labeled :])
    return Split(seed, n_labeled, n_validation, labeled, unlabeled, validation)


def write_split(split: Split, path: str | Path) -> Path:
    """Write the split as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(split), indent=2) + "\n")
    return path


def read_split(path: str | Path) -> Split:
    """Read a split written by :func:`write_split`."""
    try:
        return Split(**json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise MedsslError(f"{path}: not a medssl split file ({exc})") from None
