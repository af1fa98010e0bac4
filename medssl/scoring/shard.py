"""Deterministic shards of a manifest, so N machines without Ray can share one archive.

``medssl-score --shard I/N`` scores the series of shard ``I`` (1-based) of ``N``; every series
falls in exactly one shard, whatever machine computes the split and in whatever order the
manifest lists the series. A study is never split: the shard is chosen by a hash of the
StudyInstanceUID (the series key for a series without one), so per-study selection
(``per_study: thinnest``) sees a study's series together. ``medssl score merge``
(:mod:`medssl.scoring.merge`) joins the shards' outputs into the tables one run would give.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from medssl.errors import MedsslError
from medssl.scoring.manifest import ScanItem

__all__ = ["Shard", "parse_shard"]

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``.

    Raises:
        MedsslError: ``count`` < 1 or ``index`` outside 1..``count``.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise MedsslError(f"shard {self.index}/{self.count}: expected I/N with 1 <= I <= N")

    def holds(self, item: ScanItem) -> bool:
        """Whether ``item`` belongs to this shard (decided by its study, stable across runs)."""
        group = item.study_uid or item.key
        digest = hashlib.sha256(group.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1

    def select(self, items: Sequence[ScanItem]) -> list[ScanItem]:
        """The items of this shard, in their input order."""
        return [item for item in items if self.holds(item)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` → :class:`Shard` (e.g. ``"2/8"``: the second of eight).

    Raises:
        MedsslError: not of the form I/N with 1 <= I <= N.
    """
    match = _SHARD.match(text)
    if not match:
        raise MedsslError(f"shard {text!r}: expected I/N, e.g. 1/4 (the first of four shards)")
    return Shard(int(match.group(1)), int(match.group(2)))
