"""The method registry: name -> plug-in module, family and command help.

The registry names modules instead of importing them, so the CLI and the configs list the
methods without loading torch; :func:`~medssl.training.methods.base.load_method` imports one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medssl.errors import ConfigError

__all__ = ["REGISTRY", "MethodEntry", "check_method", "method_names"]

Family = Literal["segmentation", "detection"]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method.

    Attributes:
        name: the method's name (``medssl-train <name>``, config ``method:``).
        family: the task it trains (segmentation or detection).
        target: ``"module:Class"`` under :mod:`medssl.training.methods`.
        summary: the command's help text.
    """

    name: str
    family: Family
    target: str
    summary: str


REGISTRY: dict[str, MethodEntry] = {
    e.name: e
    for e in (
        MethodEntry(
            "focalmix",
            "detection",
            "focalmix:FocalMix",
            "Train the FocalMix nodule detector (labeled + unlabeled scans).",
        ),
        MethodEntry(
            "supervised-det",
            "detection",
            "supervised_det:SupervisedDetection",
            "Train the fully supervised nodule detector (labeled scans only).",
        ),
        MethodEntry(
            "ad",
            "segmentation",
            "ad:AD",
            "Train A&D (Diff-VNet, SVDA, DRS, pseudo-label fusion) on labeled + unlabeled cases.",
        ),
        MethodEntry(
            "supervised-seg",
            "segmentation",
            "supervised_seg:SupervisedSegmentation",
            "Train the supervised VNet baseline (labeled cases only).",
        ),
        MethodEntry(
            "mean-teacher",
            "segmentation",
            "mean_teacher:MeanTeacher",
            "Train the mean-teacher VNet baseline (labeled + unlabeled cases). "
            "--set threshold.policy=fixed|flexmatch masks its consistency to confident voxels.",
        ),
        MethodEntry(
            "bcp",
            "segmentation",
            "bcp:BCP",
            "Train BCP (bidirectional copy-paste: copy-paste pre-training, then an EMA teacher's "
            "pseudo-labels) on labeled + unlabeled cases. --config seg-bcp-la is the official LA "
            "configuration (VNet width 16, 80x112x112 crops, 2000 + 15000 steps). --set "
            "threshold.policy=fixed|flexmatch filters its pseudo-labels.",
        ),
        MethodEntry(
            "fixmatch",
            "segmentation",
            "fixmatch:FixMatch",
            "Train FixMatch for segmentation: pseudo-labels from the weak view kept where the "
            "softmax >= threshold.tau (0.95), cross-entropy on the strong (SVDA intensity) view.",
        ),
        MethodEntry(
            "flexmatch",
            "segmentation",
            "fixmatch:FixMatch",
            "Train FlexMatch for segmentation: FixMatch with curriculum pseudo-labelling (CPL) "
            "class thresholds from a voxel-grid memory over the unlabeled cases (threshold.* "
            "settings).",
        ),
        MethodEntry(
            "patchcl",
            "segmentation",
            "patchcl:PatchCL",
            "Train PatchCL: the mean teacher (strong/weak views, CE on the teacher's "
            "pseudo-labels) "
            "plus the pseudo-label guided patch contrastive loss (PLGCL) on 3D class-aware patches "
            "after a warm-up (patchcl.* settings; threshold.policy filters its pseudo-labels).",
        ),
    )
}


def method_names(family: Family) -> tuple[str, ...]:
    """The registered methods of ``family``, in registration order."""
    return tuple(name for name, e in REGISTRY.items() if e.family == family)


def check_method(name: str, family: Family) -> None:
    """Raise :class:`~medssl.errors.ConfigError` (key ``method``) unless ``name`` is a registered
    ``family`` method."""
    known = method_names(family)
    if name not in known:
        raise ConfigError(
            f"config key 'method': {name!r} is not a {family} method; choose one of "
            f"{', '.join(known)}",
            key="method",
        )
