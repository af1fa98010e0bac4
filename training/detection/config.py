"""The experiment config of the nodule detector trainers (``focalmix``, ``supervised-det``).

One YAML file per experiment (see ``training/configs/``); every value is validated at
start (:func:`medssl.config.load_config`) and the whole config is stored in
every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medssl.detection import AnchorSpec
from medssl.training.detection.losses import FocalConfig
from medssl.training.methods.registry import check_method
from medssl.training.networks.detector import DetectorConfig

__all__ = ["DataConfig", "DetectionExperiment", "EvalConfig", "FocalMixConfig", "OptimConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Data, splits and preprocessing.

    Attributes:
        spacing_mm: isotropic model grid (paper: 1 mm).
        hu_min, hu_max: intensity window, HU, mapped to [-1, 1] (the lung window).
        patch: training patch edge, voxels (paper: 160); divisible by the largest stride.
        positive_fraction: share of labeled crops centred near a nodule.
        test_subsets: LUNA16 subsets held out as the test split (never trained or validated on).
        n_validation: scans of the training pool held out to select the best checkpoint.
        split_seed: seed of the labeled / validation split of the training pool.
        unlabeled_dirs: extra folders of unlabeled scans (``.mhd``/``.nii.gz`` files, or
            DICOM trees such as NLST), used before the leftover training pool;
            ``<data>/unlabeled`` is always included when it exists.
        cache_dir: preprocessed-volume cache; default ``$MEDSSL_CACHE`` or ``~/.cache/medssl``.
        workers: DataLoader worker processes per loader.
        hard_negative_fraction: share of labeled crops centred on hard negatives: candidates
            the current model finds on the labeled training scans away from every nodule and
            excluded finding, mined at every validation round
            (:mod:`medssl.training.detection.mining`);
            random crops until the first round. 0: off (the ablation; the paper has none).
        hard_negatives_per_scan: the best candidates of a scan kept as hard negatives at most.
        hard_negative_scans: labeled scans mined per round, in turn (0: all of them).
        scanner_augment: probability that a labeled crop gets scanner augmentation: noise,
            a softer or sharper kernel, thicker slices (:mod:`medssl.training.detection.augment`;
            0: off, the paper has none). For a detector that must work on other scanners
            and protocols than its training data's.
    """

    spacing_mm: float = 1.0
    hu_min: float = -1200.0
    hu_max: float = 600.0
    patch: int = 160
    positive_fraction: float = 0.5
    test_subsets: tuple[int, ...] = (8, 9)
    n_validation: int = 10
    split_seed: int = 0
    unlabeled_dirs: tuple[str, ...] = ()
    cache_dir: str | None = None
    workers: int = 4
    hard_negative_fraction: float = 0.0
    hard_negatives_per_scan: int = 8
    hard_negative_scans: int = 0
    scanner_augment: float = 0.0

    def __post_init__(self) -> None:
        if not (
            self.hard_negative_fraction >= 0
            and self.positive_fraction + self.hard_negative_fraction <= 1
        ):
            raise ValueError(
                "need hard_negative_fraction >= 0 and positive_fraction + hard_negative_fraction "
                "<= 1, "
                f"got {self.positive_fraction} + {self.hard_negative_fraction}"
            )
        if self.hard_negatives_per_scan < 1 or self.hard_negative_scans < 0:
            raise ValueError(
                f"need hard_negatives_per_scan >= 1 and hard_negative_scans >= 0, got "
                f"{self.hard_negatives_per_scan}, {self.hard_negative_scans}"
            )
        if not 0 <= self.scanner_augment <= 1:
            raise ValueError(f"scanner_augment is a probability, got {self.scanner_augment}")
        if self.spacing_mm <= 0 or self.patch < 16:
            raise ValueError(
                f"need spacing_mm > 0 and patch >= 16, got {self.spacing_mm}, {self.patch}"
            )
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if any(not 0 <= s <= 9 for s in self.test_subsets):
            raise ValueError(f"test_subsets must be LUNA16 subsets 0..9, got {self.test_subsets}")
        if self.n_validation < 0 or self.workers < 0:
            raise ValueError("n_validation and workers must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """Adam with cosine annealing (paper §4.1: lr 1e-3, batch 8).

    Attributes:
        steps: optimisation steps (the same budget for supervised and FocalMix runs).
        batch_size: labeled patches per step (FocalMix adds as many unlabeled).
        lr, weight_decay: Adam parameters; the lr follows a cosine to 0 over ``steps``.
        grad_clip: max gradient norm (0: off).
    """

    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.grad_clip < 0:
            raise ValueError("need steps >= 1, batch_size >= 1, lr > 0 and grad_clip >= 0")


@dataclass(frozen=True)
class FocalMixConfig:
    """FocalMix switches and parameters (paper §3, §4.1); each switch is a Table 3 ablation.

    Attributes:
        k: transforms ensembled for target prediction (paper: 4).
        temperature: sharpening temperature T (paper: 0.7).
        eta: MixUp Beta parameter η (paper: 0.2).
        image_mixup, object_mixup: the two MixUp levels.
        object_threshold: guessed probability that makes an unlabeled anchor an object
            (``object_policy: fixed``); with ``flexmatch``, CPL's τ: the memory-write cut and
            the ceiling of the curriculum thresholds (:mod:`medssl.training.detection.focalmix`).
        object_policy: how unlabeled objects for object MixUp are chosen: ``"fixed"``
            (FocalMix: ``p ≥ object_threshold``) or ``"flexmatch"`` (FlexMatch CPL over two
            classes, background / nodule,
            :class:`~medssl.training.detection.focalmix.CPLObjectSelection`).
        object_memory_stride: CPL: memory cell edge, voxels of the model grid; one entry per
            cell of each unlabeled scan (default 8: about one nodule centre per cell).
        unlabeled_weight: weight of the unlabeled SFL term after ramp-up. The paper does
            not give it; SFL on mixed targets has the labeled loss's scale, and with one
            normaliser for the joint batch (:func:`~medssl.training.methods.focalmix.joint_loss`)
            weight 1.0 gives an unlabeled anchor the weight of a labeled one. (MixMatch's
            λ_U = 100, ramped linearly over its first 16k steps, goes with an L2 unlabeled
            loss between probability vectors averaged over the classes, on a far smaller
            scale than a cross-entropy.)
        rampup_fraction: linear ramp-up of that weight over this share of the steps
            (MixMatch ramps linearly; the paper does not say over how long).
        candidate_fraction: share of unlabeled crops centred (with jitter) on candidates the
            current model finds on the unlabeled scans, refreshed at every validation round;
            random crops until the first round. 0: random crops only (the paper's sampling;
            its unlabeled NLST scans were pre-selected by a detector, §4.4).
        candidates_per_scan: the best candidates of an unlabeled scan kept at most.
        candidate_scans: unlabeled scans searched per refresh, in turn (bounds the cost;
            0: all of them).
    """

    k: int = 4
    temperature: float = 0.7
    eta: float = 0.2
    image_mixup: bool = True
    object_mixup: bool = True
    object_threshold: float = 0.8
    object_policy: Literal["fixed", "flexmatch"] = "fixed"
    object_memory_stride: int = 8
    unlabeled_weight: float = 1.0
    rampup_fraction: float = 0.3
    candidate_fraction: float = 0.0
    candidates_per_scan: int = 8
    candidate_scans: int = 16

    def __post_init__(self) -> None:
        if (
            not 0 <= self.candidate_fraction <= 1
            or self.candidates_per_scan < 1
            or self.candidate_scans < 0
        ):
            raise ValueError(
                "need candidate_fraction in [0, 1], candidates_per_scan >= 1 and candidate_scans "
                ">= 0, "
                f"got {self.candidate_fraction}, {self.candidates_per_scan}, {self.candidate_scans}"
            )
        if not 1 <= self.k <= 48:
            raise ValueError(f"k must be in 1..48 (the cube group has 48 elements), got {self.k}")
        if self.temperature <= 0 or self.eta <= 0:
            raise ValueError("temperature and eta must be positive")
        if not 0 <= self.rampup_fraction <= 1 or self.unlabeled_weight < 0:
            raise ValueError("rampup_fraction must be in [0, 1] and unlabeled_weight >= 0")
        if self.object_policy == "flexmatch":
            if not 0 < self.object_threshold <= 1 or self.object_memory_stride < 1:
                raise ValueError(
                    "object_policy flexmatch needs object_threshold (CPL's tau) in (0, 1] and "
                    f"object_memory_stride >= 1, got {self.object_threshold}, "
                    f"{self.object_memory_stride}"
                )
            if not self.object_mixup:
                raise ValueError(
                    "object_policy flexmatch chooses the objects of object MixUp: "
                    "set object_mixup: true, or object_policy: fixed"
                )


@dataclass(frozen=True)
class EvalConfig:
    """Validation and test inference (the shared pipeline's parameters).

    Attributes:
        every: validate (and checkpoint) every this many steps, and at the end.
        window: sliding-window edge, voxels (divisible by the largest backbone stride);
            default: the training patch edge. A larger window sees more context, but its
            BatchNorm statistics must come from windows of that size (``bn_windows`` does
            this): before BatchNorm re-estimation a 32^3-trained CPU model scored p = 1.0 on
            soft tissue with 64^3 windows (CPM 0.0); with it, the shipped run scored validation
            CPM 0.834 at 64 against 0.770 at 32 (benchmarks/results/detector_window.md).
        overlap: window overlap fraction.
        score_threshold, nms_iou, max_detections: post-processing; LUNA16 keeps at most
            100 marks per scan.
        bootstrap: bootstrap samples of the test CPM confidence interval.
        lung_mask: validation and test inference skip windows without lung and drop findings
            outside it (:attr:`medssl.pipeline.detect.DetectionParams.lung_mask`); the
            BatchNorm windows (``bn_windows``) are then drawn among the windows touching the
            lung mask, as inference runs only those.
        bn_windows: before every validation and checkpoint, the BatchNorm running statistics
            are re-estimated (cumulative average) on this many sliding windows of the labeled
            training scans, drawn as inference draws them (same window and overlap; a fixed,
            seeded choice), so validation, test and exported weights use statistics of the
            data the model is applied to (:mod:`medssl.training.batchnorm`; issue 18: the
            training-mode statistics of the same weights cost up to 0.17 CPM). 0: off (the
            running statistics of training, for the ablation).
    """

    every: int = 1000
    window: int | None = None
    overlap: float = 0.25
    score_threshold: float = 0.01
    nms_iou: float = 0.1
    max_detections: int = 100
    bootstrap: int = 1000
    lung_mask: bool = False
    bn_windows: int = 64

    def __post_init__(self) -> None:
        if self.every < 1 or self.bootstrap < 0 or self.bn_windows < 0:
            raise ValueError(
                f"need eval.every >= 1, eval.bootstrap >= 0 and eval.bn_windows >= 0, got "
                f"{self.every}, {self.bootstrap}, {self.bn_windows}"
            )


@dataclass(frozen=True)
class DetectionExperiment:
    """Everything a detector run needs; ``method`` picks the registered method
    (:mod:`medssl.training.methods`).

    Attributes:
        method: the registered detection method (``focalmix`` or ``supervised-det``).
        seed: seed of the training (weights, patches, augmentation).
        amp: bfloat16 autocast on a GPU (ignored on the CPU).
    """

    method: str = "focalmix"
    seed: int = 0
    amp: bool = True
    model: DetectorConfig = field(default_factory=DetectorConfig)
    anchors: AnchorSpec = field(default_factory=AnchorSpec)
    loss: FocalConfig = field(default_factory=FocalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    focalmix: FocalMixConfig = field(default_factory=FocalMixConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def window(self) -> int:
        """The inference window edge: ``eval.window``, else the training patch edge."""
        return self.eval.window or self.data.patch

    def __post_init__(self) -> None:
        check_method(self.method, "detection")
        stride = self.model.strides[-1]
        for name, edge in (("data.patch", self.data.patch), ("eval.window", self.window)):
            if edge % stride:
                raise ValueError(
                    f"{name} = {edge} must be divisible by the model's largest stride {stride} "
                    "(model.widths sets the number of stages), so that flips and rotations map "
                    "anchors onto anchors"
                )
        if not set(self.anchors.strides) <= set(self.model.strides):
            raise ValueError(
                f"anchors.strides {self.anchors.strides} must be model strides {self.model.strides}"
            )
