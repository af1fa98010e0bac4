"""The experiment config of the segmentation trainers (``ad``, ``supervised-seg``, ``mean-teacher``,
``bcp``, ``fixmatch``, ``flexmatch``, ``patchcl``).

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

from medssl.errors import ConfigError
from medssl.training.methods.registry import check_method
from medssl.training.networks.diffusion import LabelDiffusion
from medssl.training.networks.vnet import VNetConfig

__all__ = [
    "ADConfig",
    "BCPConfig",
    "FixMatchConfig",
    "MeanTeacherConfig",
    "PatchCLConfig",
    "SegDataConfig",
    "SegEvalConfig",
    "SegLossConfig",
    "SegModelConfig",
    "SegOptimConfig",
    "SegmentationExperiment",
    "ThresholdConfig",
]

Setting = Literal["ssl", "imbssl", "uda", "semidg"]
Network = Literal["vnet", "unet2d"]


@dataclass(frozen=True)
class SegModelConfig(VNetConfig):
    """The network: :class:`VNetConfig`'s shape plus which network.

    Attributes:
        network: ``"vnet"`` (3D VNet; A&D's Diff-VNet for ``ad``) or ``"unet2d"``: SSL4MIS's 2D
            UNet run on every axial slice (:mod:`medssl.training.networks.unet2d`), for slice-wise
            (ACDC-style) data; ``width: 16`` and ``dropout: true`` are SSL4MIS's UNet. Every
            method but ``ad`` (whose Diff-VNet is 3D) takes it. Any patch depth works (``1``:
            one slice per crop); the in-plane edges stay multiples of 16.
    """

    network: Network = "vnet"


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
        hu_min, hu_max: the HU window of ``normalisation: hu`` (default -75..275 HU, A&D's
            Synapse clip).
        patch: training crop ``(z, y, x)``; ``y`` and ``x`` multiples of 16, ``z`` too for
            the VNet (any depth for ``model.network: unet2d``).
        svda: SVDA on every crop, labeled and unlabeled, for every method (off: random
            crop only; A&D's "w/o SVDA" ablation).
        foreground_fraction: share of labeled crops centred on a voxel of a class drawn
            uniformly among those present (nnU-Net's ``oversample_foreground_percent`` 0.33;
            :class:`~medssl.training.segmentation.data.SegCrops`). Every method's labeled crops
            use it; unlabeled crops stay uniform. 0: uniform random crops only, as the official A&D,
            BCP and SSL4MIS loaders (the paper-size configs keep 0).
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
    foreground_fraction: float = 0.0
    split_seed: int = 0
    cache_dir: str | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        if not 0 <= self.foreground_fraction <= 1:
            raise ValueError(
                f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}"
            )
        if not 0 < self.labeled_fraction <= 1:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.patch[0] < 1 or any(p < 16 or p % 16 for p in self.patch[1:]):
            raise ValueError(
                f"patch edges must be multiples of 16 (four stride-2 stages), got {self.patch}"
            )
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

    ``bcp`` keeps ``steps``, ``batch_size`` and ``momentum`` but uses its own SGD (``bcp.lr``,
    ``bcp.weight_decay``, no Nesterov) and step schedule instead of the poly one.

    Attributes:
        steps: optimisation steps (the same budget for every method).
        batch_size: labeled crops per step (and as many unlabeled ones for the SSL methods).
        momentum: SGD momentum (Nesterov).
        weight_decay: SGD weight decay.
        poly_power: exponent of the poly schedule ``lr * (1 - step / steps) ** poly_power``.
        lr: base learning rate: 1e-2, the official A&D training command (GenericSSL
            ``README.md``: ``train.sh ... -l 1e-2 -w 10``; 1e-3 is only ``train_diffusion.py``'s
            unused argparse default) and the official lr of SSL4MIS's mean teacher, UA-MT and
            BCP alike; the baselines use the same.
    """

    steps: int = 30000
    batch_size: int = 2
    lr: float = 1e-2
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
        mu: w_u, the unlabeled weight after ramp-up: 10, the official training command
            (GenericSSL ``README.md``: ``train.sh ... -w 10``; ``train_diffusion.py``'s argparse
            default 2.0 is overridden by ``train.sh`` for every task).
        rampup_fraction: μ = w_u·exp(−5(1 − e/E)²) over this share of the steps (official:
            the whole run).
        drs_momentum: EMA momentum of DRS (official ``accumulate_iters=50`` → 0.98).
        diffusion_process: T, β schedule and DDIM steps.
    """

    diffusion: bool = True
    drs: bool = True
    rs: bool = True
    ema: float = 0.99
    mu: float = 10.0
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
        rampup_fraction: sigmoid ramp-up exp(−5(1 − t)²) over this share of the steps: the
            whole run, as SSL4MIS (``train_mean_teacher_3D.py``: ``consistency_rampup`` 200 of
            ``iter_num // 150`` = 30000 iterations, its ``max_iterations``).
        noise_std, noise_clip: the teacher's input noise, clamp(N(0, σ), −c, c) (0.1, 0.2).
    """

    ema: float = 0.99
    consistency: float = 0.1
    rampup_fraction: float = 1.0
    noise_std: float = 0.1
    noise_clip: float = 0.2


@dataclass(frozen=True)
class BCPConfig:
    """Bidirectional Copy-Paste (Bai et al., CVPR 2023), official LA configuration
    (DeepMed-Lab-ECNU/BCP ``code/LA_BCP_train.py``, ``code/LA&ACDC/utils/BCP_utils.py``).

    A run is ``pretrain_steps`` of copy-paste pre-training on labeled pairs, then
    ``optim.steps - pretrain_steps`` of self-training with an EMA teacher (official: 2000 +
    15000). Both phases validate on the held-out labeled-pool cases
    (``data.n_validation``), never on the test set (the official code picks its checkpoints on
    the test set every 200 iterations); self-training starts from the best pre-trained one.

    Attributes:
        pretrain_steps: steps of the pre-training phase (official ``--pre_max_iteration``).
        mask_ratio: each edge of the zeroed box is ``int(edge * mask_ratio)`` (``--mask_ratio``);
            with ``model.network: unet2d`` the box spans the crop's depth (2D BCP on each slice,
            ``ACDC_BCP_train.py``).
        u_weight: α, the loss weight of pseudo-labeled voxels; ground truth weighs 1
            (``--u_weight``).
        ema: teacher decay (``update_ema_variables(model, ema_model, 0.99)``).
        lr, weight_decay: SGD (momentum ``optim.momentum``, no Nesterov) in both phases.
        lr_step, lr_gamma: self-training lr ×``lr_gamma`` every ``lr_step`` steps;
            pre-training keeps ``lr``.
        pseudo_threshold: two classes: foreground where the teacher's softmax ≥ this
            (``get_cut_mask``); more classes: argmax.
        largest_cc: keep the largest 26-connected component of each pseudo-labeled class
            (``LargestCC_pancreas``, ``nms=1``).
    """

    pretrain_steps: int = 2000
    mask_ratio: float = 2 / 3
    u_weight: float = 0.5
    ema: float = 0.99
    lr: float = 0.01
    weight_decay: float = 1e-4
    lr_step: int = 2500
    lr_gamma: float = 0.1
    pseudo_threshold: float = 0.5
    largest_cc: bool = True

    def __post_init__(self) -> None:
        if self.pretrain_steps < 1 or self.lr_step < 1:
            raise ValueError(
                f"need pretrain_steps >= 1 and lr_step >= 1, got {self.pretrain_steps}, "
                f"{self.lr_step}"
            )
        if not 0 < self.mask_ratio < 1 or not 0 < self.pseudo_threshold < 1:
            raise ValueError(
                f"mask_ratio and pseudo_threshold must be in (0, 1), got {self.mask_ratio}, "
                f"{self.pseudo_threshold}"
            )
        if not 0 <= self.ema < 1 or self.u_weight < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("need 0 <= ema < 1, u_weight >= 0, lr > 0 and weight_decay >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")


PolicyName = Literal["auto", "none", "fixed", "flexmatch"]


@dataclass(frozen=True)
class ThresholdConfig:
    """Which pseudo-labels the unlabeled losses train on: a
    :class:`~medssl.training.threshold.ThresholdPolicy` (FixMatch's fixed threshold or FlexMatch's
    curriculum pseudo-labelling, CPL) wherever a trainer turns the teacher's (weak view's)
    probabilities into pseudo-labels.

    * ``fixmatch`` / ``flexmatch``: the policy defines the method (fixed / CPL);
    * ``mean-teacher``: with a policy the consistency MSE is averaged over the voxels the policy
      keeps (confidence-masked mean teacher, French et al. 2018), instead of every voxel;
    * ``bcp``: pseudo-labelled voxels the policy rejects get weight 0 in the mix losses (ground
      truth voxels keep theirs);
    * ``patchcl``: the consistency CE (``L^Reg``) and the pseudo-labels of the patch sampling use
      the kept voxels only.

    Attributes:
        policy: ``"auto"``: ``fixed`` for ``fixmatch``, ``flexmatch`` for ``flexmatch``, ``none``
            for every other method (their published form); ``"none"``: every voxel, argmax (or
            BCP's 0.5 cut); ``"fixed"``: keep where max_c p ≥ ``tau``; ``"flexmatch"``: CPL.
            ``supervised-seg`` and ``ad`` take no policy.
        tau: τ, the fixed threshold or CPL's base threshold and memory-write cut-off (FixMatch's
            and FlexMatch's 0.95).
        memory_stride: CPL: the memory holds every ``memory_stride``-th voxel along each axis of
            every unlabeled case's cached volume
            (:class:`~medssl.training.threshold.VoxelMemoryLayout`); choose it from the smallest
            class (see that module).
        mapping: CPL: ``"convex"`` M(x) = x/(2 − x) (official) or ``"linear"`` M(x) = x.
        warmup: CPL: threshold warm-up (official ``thresh_warmup``).
    """

    policy: PolicyName = "auto"
    tau: float = 0.95
    memory_stride: int = 4
    mapping: Literal["convex", "linear"] = "convex"
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1 or self.memory_stride < 1:
            raise ValueError(
                f"need tau in (0, 1] and memory_stride >= 1, got {self.tau}, {self.memory_stride}"
            )


@dataclass(frozen=True)
class FixMatchConfig:
    """FixMatch for segmentation (Sohn et al., 2020) and its FlexMatch variant (Zhang et al., 2021):
    ``medssl-train fixmatch`` (``threshold.policy`` fixed) and ``medssl-train flexmatch`` (CPL).

    Per step: Dice + CE on the labeled crops; the unlabeled crop as drawn (the weak view: no SVDA)
    through the model without grad gives softmax probabilities, the threshold policy
    (``threshold:``, :mod:`medssl.training.threshold`) turns them into pseudo-labels and a keep
    mask; the strong view (SVDA's intensity ops only, so voxels stay aligned with the weak view)
    through the model with grad is trained with CE on the kept voxels (mean over kept voxels, 0 if
    none), weighted ``lambda_u``. No EMA teacher: the model labels its own weak view, as in
    FixMatch.

    Attributes:
        lambda_u: weight of the unlabeled loss (FixMatch's default 1).
    """

    lambda_u: float = 1.0

    def __post_init__(self) -> None:
        if self.lambda_u < 0:
            raise ValueError(f"need lambda_u >= 0, got {self.lambda_u}")


@dataclass(frozen=True)
class PatchCLConfig:
    """PatchCL (Basak & Yin, CVPR 2023): pseudo-label guided patch contrastive learning on top of
    the mean-teacher trainer (:mod:`medssl.training.segmentation.patchcl`). Loss (eq. 8)::

        warm-up: L = Sup + γ·PLGCL(labeled)      (step < warmup_fraction·steps)
        then:    L = Sup + β·Reg + γ·PLGCL

    ``Sup``: Dice + CE on labeled crops (the paper: CE; Dice + CE as every other method here, for
    a like-for-like table); ``Reg``: CE of the student on the strong view against the EMA
    teacher's pseudo-labels on the weak view (eq. 7), over the voxels ``threshold.policy`` keeps
    (``none``: all), at full weight from the end of the warm-up (official ``train.py``:
    ``4*consistency_loss``, no ramp-up); the teacher is an EMA of the student (``ema``).
    ``PLGCL`` (eq. 6) on 3D patches of labeled (ground truth) and, after the warm-up, unlabeled
    (teacher) crops. The official warm-up (100 epochs) trains Sup + PLGCL on labeled data only,
    as here.

    The paper leaves these open; the values and their sources:

    Attributes:
        patch: 3D patch ``(z, y, x)`` on the model grid, multiples of 16 (the VNet encoder's four
            stride-2 stages embed a patch to 1×1×1); ours (the paper's patches are 2D).
        stride: patch tiling stride; ours (half a patch: overlapping candidates).
        per_class: patches per class per step (§3.1's N nearest in entropy); ours, a CPU budget.
        min_voxels: a patch is a candidate for class k when it holds this many voxels of k.
        tau: τ, temperature (official ``PCGJCL(..., 1, 10)`` in the SSL phase: τ = 1).
        lam: λ, scale of the covariance term (official SSL phase: 10).
        zeta: ζ, weight of the negative classes; None: the official ``psi / classes present``
            with psi = ``queue_length`` (``plg_loss.py``).
        beta: β, weight of Reg (official ``4*consistency_loss``).
        gamma: γ, weight of PLGCL (official ``0.5*PCGJCL_loss``).
        warmup_fraction: share of the steps in the supervised warm-up, before the teacher's
            pseudo-labels are used (official: 100 of 300 epochs; ours 0.2 of the steps; §3.4).
        ema: teacher decay (official ``train.py``: 0.999).
        queue_length: teacher embeddings kept per class (official ``Embedding_Queues`` 4096).
        embedding_dim, hidden: projection head (official embeddings of 128).
    """

    patch: tuple[int, int, int] = (16, 16, 16)
    stride: tuple[int, int, int] = (8, 8, 8)
    per_class: int = 4
    min_voxels: int = 1
    tau: float = 1.0
    lam: float = 10.0
    zeta: float | None = None
    beta: float = 4.0
    gamma: float = 0.5
    warmup_fraction: float = 0.2
    ema: float = 0.999
    queue_length: int = 4096
    embedding_dim: int = 128
    hidden: int = 256

    def __post_init__(self) -> None:
        if any(p < 16 or p % 16 for p in self.patch) or any(s < 1 for s in self.stride):
            raise ValueError(
                f"patchcl.patch edges must be multiples of 16 and strides >= 1, got {self.patch}, "
                f"{self.stride}"
            )
        if (
            self.per_class < 1
            or self.min_voxels < 1
            or self.queue_length < 1
            or self.embedding_dim < 1
        ):
            raise ValueError("need per_class, min_voxels, queue_length and embedding_dim >= 1")
        if self.tau <= 0 or self.lam < 0 or (self.zeta is not None and self.zeta <= 0):
            raise ValueError(
                f"need tau > 0, lam >= 0 and zeta > 0, got {self.tau}, {self.lam}, {self.zeta}"
            )
        if self.beta < 0 or self.gamma < 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("need beta >= 0, gamma >= 0 and warmup_fraction in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ValueError(f"need 0 <= patchcl.ema < 1, got {self.ema}")


@dataclass(frozen=True)
class SegLossConfig:
    """The loss every method puts on labeled crops (Dice + CE,
    :func:`~medssl.training.segmentation.losses.supervised_loss`).

    Attributes:
        class_weighting: ``"none"`` (the official A&D / SSL4MIS / BCP losses) or ``"frequency"``:
            the CE term weighs class k by ``(n_0 / n_k) ** weight_power``, ``n`` the voxel counts
            of the labeled training cases on the model grid
            (:func:`~medssl.training.segmentation.losses.frequency_weights`), so that a 40-voxel
            adrenal
            gland is not drowned by 60 000 background voxels in its crop. A&D's L_diff keeps its
            DRS weights and BCP's self-training its mix losses.
        weight_power: the damping exponent of ``"frequency"``.
    """

    class_weighting: Literal["none", "frequency"] = "none"
    weight_power: float = 0.25

    def __post_init__(self) -> None:
        if self.class_weighting not in ("none", "frequency") or self.weight_power < 0:
            raise ValueError(
                f"need class_weighting 'none' or 'frequency' and weight_power >= 0, got "
                f"{self.class_weighting!r}, {self.weight_power}"
            )


@dataclass(frozen=True)
class SegEvalConfig:
    """Validation and test inference (the shared pipeline's parameters).

    Attributes:
        every: validate (and checkpoint) every this many steps, and at the end.
        overlap: sliding-window overlap (0.5; the official A&D test strides 16 voxels in-plane and 4
            in z with plain averaging, GenericSSL ``test.py:21-26``: denser, about 8x the cost).
        blending: ``"gaussian"`` or ``"constant"`` (the official test averages).
        largest_component: keep only the largest component of each class at test time.
    """

    every: int = 1000
    overlap: float = 0.5
    blending: Literal["gaussian", "constant"] = "gaussian"
    largest_component: bool = False


@dataclass(frozen=True)
class SegmentationExperiment:
    """Everything a segmentation run needs; ``method`` picks the registered method
    (:mod:`medssl.training.methods`).

    Attributes:
        method: the registered segmentation method (``medssl-train --help`` lists them).
        setting: ``ssl``, ``imbssl`` (class-imbalanced SSL), ``uda`` (labeled source,
            unlabeled target domain) or ``semidg`` (few labels over several domains, an unseen
            test domain): A&D's four settings; they shape the split.
        seed: seed of the training (weights, crops, augmentation); the split has its own
            ``data.split_seed``.
        amp: bfloat16 autocast on a GPU (ignored on the CPU).
    """

    method: str = "ad"
    setting: Setting = "ssl"
    seed: int = 0
    amp: bool = True
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    ad: ADConfig = field(default_factory=ADConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    bcp: BCPConfig = field(default_factory=BCPConfig)
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    patchcl: PatchCLConfig = field(default_factory=PatchCLConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)

    @property
    def pseudo_label_policy(self) -> Literal["none", "fixed", "flexmatch"]:
        """``threshold.policy`` with ``"auto"`` resolved for ``method``."""
        policy = self.threshold.policy
        if policy != "auto":
            return policy
        return {"fixmatch": "fixed", "flexmatch": "flexmatch"}.get(self.method, "none")  # type: ignore[return-value]

    def __post_init__(self) -> None:
        check_method(self.method, "segmentation")
        policy, own = (
            self.threshold.policy,
            {"fixmatch": "fixed", "flexmatch": "flexmatch"}.get(self.method),
        )
        if own is not None and policy not in ("auto", own):
            raise ConfigError(
                f"config key 'threshold.policy': method {self.method!r} is the {own!r} policy; got "
                f"{policy!r} (use method {'flexmatch' if policy == 'flexmatch' else 'fixmatch'} or "
                f"policy 'auto')",
                key="threshold.policy",
            )
        if self.method in ("supervised-seg", "ad") and policy not in ("auto", "none"):
            raise ConfigError(
                f"config key 'threshold.policy': method {self.method!r} has no pseudo-label "
                "filter; "
                f"it applies to mean-teacher, bcp, patchcl, fixmatch and flexmatch",
                key="threshold.policy",
            )
        if self.method == "bcp" and self.bcp.pretrain_steps >= self.optim.steps:
            raise ConfigError(
                f"config key 'bcp.pretrain_steps': {self.bcp.pretrain_steps} must be below "
                f"optim.steps ({self.optim.steps}), the rest of the run is self-training",
                key="bcp.pretrain_steps",
            )
        if self.method == "bcp" and self.optim.batch_size % 2:
            raise ConfigError(
                f"config key 'optim.batch_size': bcp copy-pastes pairs of crops and needs an even "
                f"batch size, got {self.optim.batch_size}",
                key="optim.batch_size",
            )
        network, depth = self.model.network, self.data.patch[0]
        if self.method == "patchcl" and network != "vnet":
            raise ConfigError(
                "config key 'model.network': patchcl embeds 3D patches with the VNet encoder; use "
                "'vnet'",
                key="model.network",
            )
        if self.method == "patchcl" and any(
            p > c for p, c in zip(self.patchcl.patch, self.data.patch)
        ):
            raise ConfigError(
                f"config key 'patchcl.patch': {list(self.patchcl.patch)} does not fit in the crop "
                f"data.patch {list(self.data.patch)}",
                key="patchcl.patch",
            )
        if network == "unet2d" and self.method == "ad":
            raise ConfigError(
                "config key 'model.network': 'unet2d' does not fit method 'ad' (A&D's Diff-VNet "
                "is 3D); use 'vnet', or unet2d with another method",
                key="model.network",
            )
        if network == "vnet" and (depth < 16 or depth % 16):
            raise ConfigError(
                f"config key 'data.patch': the VNet needs a depth that is a multiple of 16 (four "
                f"stride-2 stages), got {list(self.data.patch)}; only model.network 'unet2d' "
                f"takes any depth",
                key="data.patch",
            )
