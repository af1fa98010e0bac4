"""Segmentation data: domain splits, cached volumes, and training crops.

Every crop is a pure function of ``(seed, stream, index)``, as for the detector
(:mod:`medssl.training.detection.data`), so a run is reproducible with any number of workers
and a resumed run continues the same stream. Volumes are cached on the model grid
(:class:`~medssl.training.cache.VolumeCache`); labels are renumbered to ``0..K`` at crop time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.datasets.decathlon import Decathlon, DecathlonCase
from medssl.errors import MedsslError
from medssl.pipeline.windows import extract_window
from medssl.training.cache import CachedVolume, VolumeCache
from medssl.training.segmentation.config import SegDataConfig
from medssl.training.segmentation.svda import SVDA, apply_svda
from medssl.training.threshold import VoxelMemoryLayout

__all__ = [
    "FOREGROUND_LOCATIONS",
    "DomainCase",
    "LabeledVolume",
    "SegCrops",
    "SegSplit",
    "class_names",
    "label_lookup",
    "split_domains",
]

#: Voxels kept per class to centre foreground crops on (nnU-Net's ``num_samples`` = 10000).
FOREGROUND_LOCATIONS = 10000


@dataclass(frozen=True)
class DomainCase:
    """One case of one domain's Decathlon dataset; ``key`` is unique across domains."""

    domain: str
    dataset: Decathlon
    case: DecathlonCase

    @property
    def key(self) -> str:
        prefix = "" if self.domain == "." else f"{self.domain}__"
        return f"{prefix}{self.case.case_id}"


@dataclass(frozen=True)
class SegSplit:
    """Labeled / unlabeled / validation / test cases of a run."""

    labeled: list[DomainCase]
    unlabeled: list[DomainCase]
    validation: list[DomainCase]
    test: list[DomainCase]
    labels: dict[int, str]

    def to_json(self) -> dict[str, list[str]]:
        return {
            name: [c.key for c in getattr(self, name)]
            for name in ("labeled", "unlabeled", "validation", "test")
        }


def _open_domain(data: Path, domain: str) -> Decathlon:
    root = data if domain == "." else data / domain
    if not (root / "dataset.json").is_file():
        raise MedsslError(
            f"{root}: no dataset.json for domain {domain!r}. --data must hold one Decathlon "
            "dataset per "
            "domain (DATA/<domain>/dataset.json, e.g. from `medssl synth organs --domain "
            f"{domain} DATA/{domain}`), "
            "or be a Decathlon dataset itself (domain '.')"
        )
    return Decathlon(root)


def split_domains(data: str | Path, cfg: SegDataConfig) -> SegSplit:
    """The run's cases (see :class:`~medssl.training.segmentation.config.SegDataConfig`).

    Per labeled-pool domain, training cases are shuffled with ``split_seed``; validation
    cases are dealt round-robin over domains first, then ``labeled_fraction`` of each
    domain's rest is labeled (at least one), and the remainder is unlabeled.

    Raises:
        MedsslError: a missing domain folder, a domain with too few cases, or test domains
            without ``labelsTs``.
    """
    data = Path(data)
    rng = np.random.default_rng(cfg.split_seed)
    pools: dict[str, list[DomainCase]] = {}
    labels: dict[int, str] | None = None
    for domain in cfg.domains:
        ds = _open_domain(data, domain)
        labels = labels or dict(ds.labels)
        cases = [DomainCase(domain, ds, c) for c in ds.training]
        pools[domain] = [cases[i] for i in rng.permutation(len(cases))]
    assert labels is not None
    validation: list[DomainCase] = []
    for i in range(cfg.n_validation):
        pool = pools[cfg.domains[i % len(cfg.domains)]]
        if len(pool) < 2:
            raise MedsslError(
                f"not enough training cases to hold out {cfg.n_validation} for validation"
            )
        validation.append(pool.pop())
    labeled, unlabeled = [], []
    for pool in pools.values():
        n = max(1, round(cfg.labeled_fraction * len(pool)))
        labeled += pool[:n]
        unlabeled += pool[n:]
    for domain in cfg.unlabeled_domains:
        ds = _open_domain(data, domain)
        unlabeled += [DomainCase(domain, ds, c) for c in ds.training]
    test = []
    for domain in cfg.tested_on:
        ds = _open_domain(data, domain)
        missing = [c.case_id for c in ds.test if c.label is None]
        if missing:
            raise MedsslError(
                f"test domain {domain!r}: no labelsTs for {missing[:3]}... (needed to score the "
                "test set)"
            )
        test += [DomainCase(domain, ds, c) for c in ds.test]
    if cfg.classes:
        unknown = sorted(set(cfg.classes) - set(labels))
        if unknown:
            raise MedsslError(f"data.classes {unknown} are not labels of the dataset ({labels})")
    return SegSplit(labeled, unlabeled, validation, test, labels)


def class_names(split: SegSplit, cfg: SegDataConfig) -> dict[int, str]:
    """Model class index → name, background 0 included."""
    codes = list(cfg.classes) or sorted(c for c in split.labels if c > 0)
    return {0: "background", **{i: split.labels[c] for i, c in enumerate(codes, start=1)}}


def label_lookup(split: SegSplit, cfg: SegDataConfig) -> np.ndarray:
    """uint8 table: dataset label code → model class index (unlisted codes → 0)."""
    table = np.zeros(256, dtype=np.uint8)
    codes = list(cfg.classes) or sorted(c for c in split.labels if c > 0)
    for i, code in enumerate(codes, start=1):
        table[code] = i
    return table


@dataclass(frozen=True)
class LabeledVolume:
    """A cached image and (for labeled cases) its mask on the same grid."""

    image: CachedVolume
    label: CachedVolume | None


def cache_case(cache: VolumeCache, case: DomainCase, with_label: bool) -> LabeledVolume:
    """Preprocess (once) and memory-map a case, and its label when asked."""
    image = cache.get(case.key, lambda: case.dataset.image(case.case))
    label = cache.get_mask(case.key, lambda: case.dataset.label(case.case)) if with_label else None
    return LabeledVolume(image, label)


class SegCrops(Dataset):
    """Random ``patch`` crops (padded where a volume is smaller), optionally with SVDA.

    With ``foreground`` > 0 (labeled volumes) that share of crops is centred on foreground, as
    nnU-Net's ``oversample_foreground_percent`` (0.33): a class present in the case is drawn
    uniformly, then one of its voxels (from up to :data:`FOREGROUND_LOCATIONS` per class,
    nnU-Net's ``num_samples``), and the crop is centred there, shifted to stay inside the volume
    where it fits. Drawing the class first is what lets a 30-voxel adrenal gland be seen as often
    as the liver. Deviation: nnU-Net forces the last third of each batch; here every crop
    draws independently (``rng.random() < foreground``), which keeps items a pure function of
    their index.

    Item ``i``: ``image (1, Z, Y, X)`` float32 and, for labeled volumes, ``label (Z, Y, X)``
    int64 model classes.

    With ``weak_strong`` (FixMatch/FlexMatch's unlabeled crops) ``image`` is the weak view, the
    crop as drawn (no SVDA), and the item also carries ``strong (1, Z, Y, X)``: the same crop
    with SVDA's intensity ops only (blur, brightness, contrast, gamma; the drawn rotation and zoom
    are dropped so the two views stay voxel-aligned; without ``svda`` it equals the weak view).
    The draws are the same as without ``weak_strong``.

    With a CPL ``layout`` (unlabeled volumes only) the item also carries ``ids (Z, Y, X)`` int64:
    each voxel's FlexMatch memory index (:meth:`VoxelMemoryLayout.crop_id_map`, ``-1`` off the
    memory grid), moved by SVDA's rotation and zoom like a label (nearest neighbour), so the ids
    follow the voxels of ``image`` (of the weak view with ``weak_strong``).

    Args:
        volumes: cached cases; all labeled or all unlabeled.
        patch: crop ``(z, y, x)``.
        lookup: label code → class table (:func:`label_lookup`).
        svda: the augmentation, or ``None`` for crops only.
        pad_value: normalised intensity outside a volume.
        seed, stream: the sample stream (labeled and unlabeled crops use different streams).
        weak_strong: return weak and strong views (see above).
        layout: the CPL memory layout of ``volumes`` (in their order), to return ``ids``.
        foreground: share of crops centred on a foreground class (labeled volumes only).
    """

    def __init__(
        self,
        volumes: Sequence[LabeledVolume],
        patch: Sequence[int],
        lookup: np.ndarray,
        svda: SVDA | None,
        pad_value: float,
        seed: int,
        stream: int,
        weak_strong: bool = False,
        layout: VoxelMemoryLayout | None = None,
        foreground: float = 0.0,
    ) -> None:
        if not volumes:
            raise ValueError("no volumes to crop")
        if not 0 <= foreground <= 1:
            raise ValueError(f"foreground must be in [0, 1], got {foreground}")
        if foreground and any(v.label is None for v in volumes):
            raise ValueError("foreground oversampling needs labeled volumes")
        if layout is not None and (
            layout.n_cases != len(volumes) or any(v.label is not None for v in volumes)
        ):
            raise ValueError("a CPL layout needs unlabeled volumes, one layout case per volume")
        self.volumes, self.patch = list(volumes), tuple(int(p) for p in patch)
        self.lookup, self.svda, self.pad_value = lookup, svda, pad_value
        self.seed, self.stream = seed, stream
        self.weak_strong, self.layout = weak_strong, layout
        self.foreground = foreground
        self._locations: dict[int, dict[int, np.ndarray]] = {}

    def class_locations(self, case: int) -> dict[int, np.ndarray]:
        """Model class (> 0) present in volume ``case`` → flat indices of up to
        :data:`FOREGROUND_LOCATIONS` of its voxels (a fixed subsample; computed once)."""
        if case not in self._locations:
            label = self.volumes[case].label
            assert label is not None
            classes = self.lookup[np.asarray(label.array)].ravel()
            order = np.argsort(classes, kind="stable")
            bounds = np.searchsorted(classes[order], np.arange(int(classes.max()) + 2))
            rng = np.random.default_rng([self.seed, case])
            found = {}
            for k in range(1, len(bounds) - 1):
                flat = order[bounds[k] : bounds[k + 1]]
                if len(flat) > FOREGROUND_LOCATIONS:
                    flat = np.sort(rng.choice(flat, FOREGROUND_LOCATIONS, replace=False))
                if len(flat):
                    found[k] = flat
            self._locations[case] = found
        return self._locations[case]

    def _start(self, rng: np.random.Generator, case: int, shape: tuple[int, ...]) -> list[int]:
        if self.foreground and rng.random() < self.foreground:
            locations = self.class_locations(case)
            if locations:
                classes = sorted(locations)
                flat = locations[classes[int(rng.integers(len(classes)))]]
                centre = np.unravel_index(int(flat[int(rng.integers(len(flat)))]), shape)
                return [
                    int(min(max(c - p // 2, 0), max(n - p, 0)))
                    for c, p, n in zip(centre, self.patch, shape)
                ]
        return [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(shape, self.patch)]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, index])
        case = int(rng.integers(len(self.volumes)))
        vol = self.volumes[case]
        shape = vol.image.array.shape
        start = self._start(rng, case, shape)
        image = extract_window(vol.image.array, start, self.patch, self.pad_value)
        label = None
        if vol.label is not None:
            label = self.lookup[extract_window(vol.label.array, start, self.patch, 0)]
        ids = (
            self.layout.crop_id_map(case, start, self.patch).numpy()
            if self.layout is not None
            else None
        )
        if self.weak_strong:
            item = self._views(image, label, rng)
        else:
            if self.svda is not None:
                params = self.svda.sample(rng)
                image, label = apply_svda(image, label, params, pad_value=self.pad_value)
                if ids is not None:  # shifted by one so that the zero padding reads "off the grid"
                    ids = apply_svda(np.zeros(ids.shape, np.float32), ids + 1, params)[1] - 1
            item = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None])}
            if label is not None:
                item["label"] = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        if ids is not None:
            item["ids"] = torch.from_numpy(np.ascontiguousarray(ids))
        return item

    def _views(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        strong = image
        if self.svda is not None:
            params = replace(
                self.svda.sample(rng), rotation_deg=None, scale=None
            )  # keep voxels aligned
            strong, _ = apply_svda(image, None, params, pad_value=self.pad_value)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "strong": torch.from_numpy(np.ascontiguousarray(strong, dtype=np.float32)[None]),
        }
        if label is not None:
            item["label"] = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return item
