"""The experiment config of the segmentation trainers (``ad``, ``supervised-seg``, ``mean-teacher``).

The four A&D settings are configuration, not code (see ``training/configs/seg-*.yaml``):

* **ssl**: one domain; a labeled fraction of its training cases, the rest unlabeled;
* **imbssl**: the same with many classes of very different sizes (class-imbalanced SSL);
* **uda**: every source-domain case labeled, the target domain unlabeled, tested on the target;
* **semidg**: a small labeled fraction of several domains, tested on a domain never seen.

``--data`` is a folder of Decathlon datasets, one per domain (``DATA/<domain>/dataset.json``),
as ``medssl synth organs --domain D DATA/D`` writes them; a single Decathlon dataset is the
domain ``"."``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medssl.training.diffusion import LabelDiffusion
from medssl.training.vnet import VNetConfig

__all__ = ["ADConfig", "MeanTeacherConfig", "SegDataConfig", "SegEvalConfig", "SegOptimConfig",
           "SegmentationExperiment"]

Setting = Literal["ssl", "imbssl", "uda", "semidg"]
Method = Literal["ad", "supervised-seg", "mean-teacher"]


@dataclass(frozen=True)
class SegDataConfig:
    """Domains, splits and preprocessing.

    Attributes:
        domains: domains whose training cases form the labeled pool.
        unlabeled_domains: domains whose training cases are all unlabeled (UDA's target).
            The labeled-pool domains' leftover cases are unlabeled too.
        test_domains: domains whose ``imagesTs`` + ``labelsTs`` are the test set; default
            ``domains``.
        labeled_fraction: share of each labeled-pool domain's training cases (after
            validation is taken out) used with labels; at least one case per domain.
        n_validation: labeled-pool cases held out to pick the best checkpoint (never the
            test set), taken round-robin over ``domains``.
        classes: label codes to segment, renumbered 1..K in this order (others become
            background); empty: every label of the dataset.
        spacing_mm: model grid ``(z, y, x)``.
        normalisation: ``"hu"``: the window ``[hu_min, hu_max]`` onto ``[-1, 1]`` (CT; A&D
            Synapse clips to [-75, 275]); ``"percentile"``: per-volume 0.5–99.5 percentile
            window onto ``[-1, 1]`` (A&D's M&Ms / MR preprocessing; needed when domains
            differ in modality).
        patch: training crop ``(z, y, x)``, multiples of 16.
        svda: SVDA on every crop, labeled and unlabeled, for every method (off: random
            crop only; A&D's "w/o SVDA" ablation).
        split_seed: seed of the split.
        cache_dir: preprocessed-volume cache; default ``$MEDSSL_CACHE`` or ``~/.cache/medssl``.
        workers: DataLoader worker processes per loader.
    """

    domains: tuple[str, ...] = (".",)
    unlabeled_domains: tuple[str, ...] = ()
    test_domains: tuple[str, ...] = ()
    labeled_fraction: float = 0.2
    n_validation: int = 2
    classes: tuple[int, ...] = ()
    spacing_mm: tuple[float, float, float] = (4.0, 3.0, 3.0)
    normalisation: Literal["hu", "percentile"] = "hu"
    hu_min: float = -75.0
    hu_max: float = 275.0
    patch: tuple[int, int, int] = (64, 128, 128)
    svda: bool = True
    split_seed: int = 0
    cache_dir: str | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        if not 0 < self.labeled_fraction <= 1:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {self.labeled_fraction}")
        if any(p < 16 or p % 16 for p in self.patch):
            raise ValueError(f"patch edges must be multiples of 16 (four stride-2 stages), got {self.patch}")
        if min(self.spacing_mm) <= 0 or self.n_validation < 0 or self.workers < 0:
            raise ValueError("need spacing_mm > 0, n_validation >= 0 and workers >= 0")
        if any(c < 1 for c in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct label codes >= 1, got {self.classes}")

    @property
    def tested_on(self) -> tuple[str, ...]:
        return self.test_domains or self.domains


@dataclass(frozen=True)
class SegOptimConfig:
    """SGD, Nesterov, momentum 0.9, weight decay 3e-5, poly lr (power 0.9): official
    ``train_diffusion.py``; ``batch_size`` labeled + as many unlabeled crops per step.

    Attributes:
        steps: optimisation steps (the same budget for every method).
        lr: base learning rate (official 1e-3 for A&D; the baselines use the same).
    """

    steps: int = 30000
    batch_size: int = 2
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 3e-5
    poly_power: float = 0.9

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("need steps >= 1, batch_size >= 1 and lr > 0")


@dataclass(frozen=True)
class ADConfig:
    """A&D (official ``train_diffusion.py`` defaults); the switches are Table 5's ablations.

    Attributes:
        diffusion: the denoising branch (off: D_ξ is a plain image decoder, "w/o Diffusion").
        drs: difficulty-aware re-weighting of L_diff (off: uniform, "w/o DRS").
        rs: Reparameterize & Smooth of p_ξ, Gumbel-softmax τ=1 then a 3×3×3 Gaussian σ=1
            (off: softmax, "w/o RS").
        ema: θ ← ema·θ + (1 − ema)·(ξ + ψ)/2 before every step.
        mu: w_u, the unlabeled weight after ramp-up (official ``--mu 2.0``).
        rampup_fraction: μ = w_u·exp(−5(1 − e/E)²) over this share of the steps (official:
            the whole run).
        drs_momentum: EMA momentum of DRS (official ``accumulate_iters=50`` → 0.98).
        diffusion_process: T, β schedule and DDIM steps.
    """

    diffusion: bool = True
    drs: bool = True
    rs: bool = True
    ema: float = 0.99
    mu: float = 2.0
    rampup_fraction: float = 1.0
    drs_momentum: float = 0.98
    diffusion_process: LabelDiffusion = field(default_factory=LabelDiffusion)

    def __post_init__(self) -> None:
        if not 0 <= self.ema < 1 or self.mu < 0 or not 0 <= self.rampup_fraction <= 1:
            raise ValueError("need 0 <= ema < 1, mu >= 0 and rampup_fraction in [0, 1]")


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Mean teacher as UA-MT / SSL4MIS run it (``train_mean_teacher_3D.py``).

    Attributes:
        ema: teacher decay (0.99).
        consistency: weight of the MSE between softmaxes after ramp-up (0.1).
        rampup_fraction: sigmoid ramp-up exp(−5(1 − t)²) over this share of the steps.
        noise_std, noise_clip: the teacher's input noise, clamp(N(0, σ), −c, c) (0.1, 0.2).
    """

    ema: float = 0.99
    consistency: float = 0.1
    rampup_fraction: float = 0.25
    noise_std: float = 0.1
    noise_clip: float = 0.2


@dataclass(frozen=True)
class SegEvalConfig:
    """Validation and test inference (the shared pipeline's parameters).

    Attributes:
        every: validate (and checkpoint) every this many steps, and at the end.
        overlap: sliding-window overlap (official test: stride = patch/2 in-plane).
        blending: ``"gaussian"`` or ``"constant"`` (the official test averages).
        largest_component: keep only the largest component of each class at test time.
    """

    every: int = 1000
    overlap: float = 0.5
    blending: Literal["gaussian", "constant"] = "gaussian"
    largest_component: bool = False


@dataclass(frozen=True)
class SegmentationExperiment:
    """Everything a segmentation run needs; ``method`` picks the trainer step."""

    method: Method = "ad"
    setting: Setting = "ssl"
    seed: int = 0
    amp: bool = True
    model: VNetConfig = field(default_factory=VNetConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    ad: ADConfig = field(default_factory=ADConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
