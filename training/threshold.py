"""Pseudo-label threshold policies: FixMatch's fixed threshold and FlexMatch's curriculum
pseudo-labelling (CPL, Zhang et al., NeurIPS 2021).

A :class:`ThresholdPolicy` turns the teacher's (weak view's) class probabilities into hard
pseudo-labels and a keep mask; trainers (FixMatch/FlexMatch, the mean-teacher and BCP
pseudo-label filters, PatchCL) call it wherever they threshold probabilities::

    labels, keep = policy.pseudo_label(probs, sample_ids)   # mask, then update (official order)

* :class:`FixedThreshold` (FixMatch): keep where ``max_c p ≥ τ``; no state.
* :class:`FlexMatchThreshold` (CPL): per-class thresholds from a memory holding, for every
  unlabeled sample, the class of its latest confident prediction (``-1``: none yet).

CPL, as the paper and the official code (TorchSSL/TorchSSL ``models/flexmatch/flexmatch.py`` and
``flexmatch_utils.py`` @ f26e1d4; microsoft/Semi-supervised-learning
``semilearn/algorithms/flexmatch/utils.py`` and ``flexmatch.py`` @ 1ef4cbe)::

    memory[n] ← argmax_c p_n   whenever max_c p_n ≥ τ             (``selected_label``)
    σ_t(c)    = #{n : memory[n] = c}                              learning effect
    β_t(c)    = σ_t(c) / max(max_c σ_t, N − Σ_c σ_t)              with threshold warm-up
              = σ_t(c) / max_c σ_t                                without
    T_t(c)    = M(β_t(c)) · τ,   M(x) = x / (2 − x)  ("convex")  or  M(x) = x  ("linear")
    keep      = max_c p ≥ T_t(argmax_c p)

Details taken from the official code (not all are in the paper):

* **Order.** A batch is masked with the thresholds of the memory *before* that batch, and the
  memory is updated afterwards: TorchSSL computes ``classwise_acc`` at the top of the iteration
  (``flexmatch.py`` L146-156), masks in ``consistency_loss`` (L171-178, ``flexmatch_utils.py``
  L44) and writes ``selected_label`` last (``flexmatch.py`` L180-181); USB's
  ``FlexMatchThresholdingHook.masking`` masks with the current ``classwise_acc`` (``utils.py``
  L53), then writes ``selected_label`` (L59-60) and recomputes ``classwise_acc`` for the next
  batch (L61). :meth:`ThresholdPolicy.pseudo_label` follows that order.
* **Comparisons are ``≥``.** Memory writes use ``max_probs.ge(p_cutoff)`` (``flexmatch_utils.py``
  L46, ``utils.py`` L55), the paper writes ``> τ``; the keep mask is ``max_probs.ge(T)``
  (``flexmatch_utils.py`` L44, ``utils.py`` L53).
* **Warm-up denominator.** ``Counter(selected_label)`` counts the ``-1`` entries too, so
  ``max(pseudo_counter.values())`` is ``max(max_c σ, N − Σσ)`` (``utils.py`` L25-29); without
  warm-up the ``-1`` key is dropped (L31-35).
* **Start.** ``classwise_acc`` starts at zeros (``utils.py`` L21; TorchSSL L126) and is left
  unchanged while every entry is ``-1`` (the guard ``max(...) < ulb_dest_len``, L26). So at
  t = 0 every β is 0 and every threshold ``M(0)·τ = 0``: all pseudo-labels pass, and thresholds
  rise from 0 as the memory fills ("threshold warm-up"). Here β is 0 whenever its denominator
  is 0 (only possible without warm-up and an empty memory), which gives the same values.
* **Divergence, documented.** The same guard also skips the update when *every* entry holds the
  same class (``max(...) == N``), leaving the previous β. We always apply the formula (then
  β = 1 for that class, 0 elsewhere), so β is a function of the memory alone and a checkpoint
  only needs the memory (USB also saves ``classwise_acc``, ``flexmatch.py`` L122-123).
* **Mapping.** The official default is the "convex" ``x / (2 − x)`` (``flexmatch_utils.py`` L44);
  its commented-out ``# linear`` line is ``(x + 1) / 2`` (L42), which is *not* offered here: our
  ``"linear"`` is the paper's un-mapped ``T = β·τ`` (identity M).
* **Duplicates.** If one sample id occurs twice in a batch the official scatter
  ``selected_label[idx] = ...`` is undefined on GPU; here the last occurrence (in flattened
  C order) wins.

Segmentation: what a "sample" is
--------------------------------
CPL counts samples per class, so the unit must let every class own samples. A per-*patch* memory
(one argmax or majority class per crop) gives almost every patch the class "background" — a
small organ would almost never be a patch's class, its σ would stay near 0 and its threshold
near 0 for the whole run regardless of how well it is learned, and random crops have no stable
identity to remember across iterations. We therefore key the memory by **voxel**: for each
unlabeled case, the voxels of a **fixed subsampling grid** of its preprocessed (cached, model
grid) volume — every ``s``-th voxel along each axis, anchored at voxel ``(0, 0, 0)``
(:class:`VoxelMemoryLayout`). A small organ then owns entries in proportion to its volume (a
2 cm sphere on the default 4×3×3 mm grid is ~115 voxels: ~15 entries per case at stride 2, ~2 at
stride 4 — choose the stride from the smallest class), the entries are the same from crop to
crop (so "the latest confident prediction of this sample" means what it means in the paper),
and memory is bounded by the stride. Memory index of grid voxel ``(gz, gy, gx)`` of
case ``k``: ``offset[k] + (gz·GY + gy)·GX + gx``, with ``G = ceil(shape / s)`` per case.
:meth:`VoxelMemoryLayout.crop_indices` maps a crop (case, corner, shape; the corner may be
negative or run past the volume, as :func:`medssl.pipeline.windows.extract_window` allows) to
the memory indices of its grid voxels and their positions inside the crop; trainers pass
``probs[b, :, pz, py, px]`` (``(M, C)``) with those indices (``(M,)``) to ``update``, or a dense id
map (:meth:`VoxelMemoryLayout.crop_id_map`, ``-1`` off the grid) that can follow flips/resampling
of the weak view. Thresholds are per class, so ``mask`` applies to every voxel of the crop, not
just the grid ones.

Caveat under 3D class imbalance: σ(c) counts voxels, so it mixes "how well is c learned" with
"how big is c". Background dominates max_c σ and gets T ≈ τ early; a small organ's β stays
small even when it is learned well, so its threshold stays low — lenient pseudo-labels for small
organs, which is the intended CPL effect for under-represented classes, but not a learning-effect
estimate comparable across classes. (Normalising σ by class frequency is a possible variant; it
is not in the paper and not implemented.)

Memory: one ``int8`` per entry for ≤ 127 classes (``int16`` ≤ 32767, else ``int32``). 100 cases
of 64×128×128 voxels at stride 4: 100 · 16·32·32 = 1,638,400 entries = 1,638,400 bytes
(1.56 MiB) in ``int8``; at stride 2, 13.1 MB. Per-class counts are kept incrementally (O(batch)
per update, never a pass over the memory).

Distributed training: every rank must apply the same updates, or the ranks' memories and
thresholds drift apart. The segmentation trainers do
(:func:`medssl.training.methods.common.filter_pseudo_labels`
masks with the rank's own batch, then updates with every rank's probabilities and ids,
all-gathered), so every rank holds the same memory — tested on two gloo ranks.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch

__all__ = [
    "CPLMapping",
    "FixedThreshold",
    "FlexMatchThreshold",
    "ThresholdPolicy",
    "VoxelMemoryLayout",
    "cpl_mapping",
    "memory_dtype",
]


class CPLMapping(str, Enum):
    """The non-linear mapping M of normalised learning effects to threshold scales."""

    CONVEX = "convex"  # M(x) = x / (2 − x), official default (flexmatch_utils.py L44)
    LINEAR = "linear"  # M(x) = x, the paper's un-mapped T = β·τ


def cpl_mapping(beta: torch.Tensor, mapping: str | CPLMapping = CPLMapping.CONVEX) -> torch.Tensor:
    """M(β), elementwise, for β in [0, 1]: ``"convex"`` x/(2 − x) (M(0) = 0, M(½) = ⅓,
    M(1) = 1) or ``"linear"`` x. Returns a tensor of ``beta``'s shape and dtype."""
    kind = CPLMapping(mapping)
    if kind is CPLMapping.CONVEX:
        return beta / (2.0 - beta)
    return beta.clone()


def memory_dtype(n_classes: int) -> torch.dtype:
    """The smallest signed integer dtype holding classes ``0..n_classes − 1`` and ``-1``."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if n_classes <= 127:
        return torch.int8
    if n_classes <= 32767:
        return torch.int16
    return torch.int32


def _max_and_argmax(
    probabilities: torch.Tensor, n_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, *S)`` probabilities → ``max_c p`` and ``argmax_c p``, both ``(N, *S)``.

    Half precision is compared in float32; ties go to the lowest class (``torch.max``)."""
    if not isinstance(probabilities, torch.Tensor) or not probabilities.is_floating_point():
        raise TypeError(
            "probabilities must be a floating-point tensor (N, C, ...); "
            "apply softmax to logits first"
        )
    if probabilities.ndim < 2:
        raise ValueError(
            f"probabilities must be (N, C, ...), got shape {tuple(probabilities.shape)}"
        )
    if n_classes is not None and probabilities.shape[1] != n_classes:
        raise ValueError(
            f"probabilities have {probabilities.shape[1]} classes on dim 1, "
            f"the policy was built for {n_classes}"
        )
    p = probabilities.detach()
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    max_probs, labels = p.max(dim=1)
    return max_probs, labels


class ThresholdPolicy(abc.ABC):
    """Turns class probabilities into pseudo-labels and which of them to train on.

    Shapes: ``probabilities (N, C, *S)`` (softmax over dim 1; ``S`` empty for classification,
    ``(Z, Y, X)`` for 3D segmentation), ``sample_ids (N, *S)`` int64 memory indices with ``-1``
    for "no memory entry", ``pseudo_labels (N, *S)`` int64, ``keep (N, *S)`` bool.
    """

    @abc.abstractmethod
    def mask(
        self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(argmax_c p (N, *S) int64, keep (N, *S) bool)`` with the current thresholds; no
        state changes."""

    @abc.abstractmethod
    def update(self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None) -> None:
        """Record a batch's predictions (no-op for stateless policies)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors on CPU and plain Python values)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if it was written by a policy of
        another configuration."""

    def pseudo_label(
        self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`mask` with the thresholds from before this batch, then :meth:`update` — the
        official FlexMatch order (see the module docstring)."""
        out = self.mask(probabilities, sample_ids)
        self.update(probabilities, sample_ids)
        return out


class FixedThreshold(ThresholdPolicy):
    """FixMatch (Sohn et al., 2020): keep a pseudo-label where ``max_c p ≥ τ``.

    Args:
        tau: confidence threshold in (0, 1]; FixMatch's 0.95.
    """

    def __init__(self, tau: float = 0.95) -> None:
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.tau = float(tau)

    def mask(
        self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        max_probs, labels = _max_and_argmax(probabilities, None)
        return labels, max_probs >= self.tau

    def update(self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"policy": "fixed", "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != "fixed" or state.get("tau") != self.tau:
            raise ValueError(
                f"checkpoint holds threshold policy {state.get('policy')!r} with "
                f"tau={state.get('tau')}, this is 'fixed' with tau={self.tau}: "
                "build the policy with the checkpoint's settings"
            )


class FlexMatchThreshold(ThresholdPolicy):
    """FlexMatch curriculum pseudo-labelling: class thresholds ``T_t(c) = M(β_t(c))·τ`` from a
    memory of each unlabeled sample's latest confident prediction (module docstring).

    Args:
        n_classes: C, background included for segmentation.
        n_samples: N, the memory size: unlabeled images (classification) or
            :attr:`VoxelMemoryLayout.n_samples` (segmentation).
        tau: the fixed threshold τ in (0, 1]: memory writes need ``max p ≥ τ`` and thresholds
            scale it (official ``p_cutoff`` 0.95).
        warmup: threshold warm-up (official ``thresh_warmup``, default on).
        mapping: ``"convex"`` (official) or ``"linear"`` (:class:`CPLMapping`).
        device: where the memory lives (CPU by default; ids are moved to it).
    """

    def __init__(
        self,
        n_classes: int,
        n_samples: int,
        *,
        tau: float = 0.95,
        warmup: bool = True,
        mapping: str | CPLMapping = CPLMapping.CONVEX,
        device: str | torch.device = "cpu",
    ) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        try:
            self.mapping = CPLMapping(mapping)
        except ValueError:
            names = [m.value for m in CPLMapping]
            raise ValueError(f"mapping must be one of {names}, got {mapping!r}") from None
        self.n_classes, self.n_samples = int(n_classes), int(n_samples)
        self.tau, self.warmup = float(tau), bool(warmup)
        self._memory = torch.full(
            (self.n_samples,), -1, dtype=memory_dtype(self.n_classes), device=device
        )
        self._counts = torch.zeros(self.n_classes, dtype=torch.int64, device=device)

    # -- statistics -------------------------------------------------------------------------

    @property
    def memory(self) -> torch.Tensor:
        """``(N,)`` the latest confident class per sample, ``-1`` where none (the live tensor:
        read it, do not write it; σ is kept in step with it)."""
        return self._memory

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the memory."""
        return self._memory.numel() * self._memory.element_size()

    def learning_effect(self) -> torch.Tensor:
        """σ_t ``(C,)`` int64: samples whose stored prediction is each class."""
        return self._counts.clone()

    def normalised_effect(self) -> torch.Tensor:
        """β_t ``(C,)`` float64 in [0, 1] (module docstring); 0 where the denominator is 0."""
        sigma = self._counts.double()
        denominator = sigma.max()
        if self.warmup:
            denominator = torch.maximum(denominator, self.n_samples - sigma.sum())
        if denominator.item() == 0:
            return torch.zeros_like(sigma)
        return sigma / denominator

    def thresholds(self) -> torch.Tensor:
        """T_t ``(C,)`` float64: ``M(β_t(c))·τ``."""
        return cpl_mapping(self.normalised_effect(), self.mapping) * self.tau

    # -- policy -----------------------------------------------------------------------------

    def _keep(self, max_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # compared in the probabilities' dtype, as the official float32 `max_probs.ge(...)`
        t = self.thresholds().to(device=max_probs.device, dtype=max_probs.dtype)
        return max_probs >= t[labels]

    def mask(
        self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``argmax p = c`` where ``max p ≥ T_t(c)``; ``sample_ids`` are not needed
        (thresholds are per class) and are ignored."""
        max_probs, labels = _max_and_argmax(probabilities, self.n_classes)
        return labels, self._keep(max_probs, labels)

    def update(self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None) -> None:
        """Write ``argmax p`` into ``memory[sample_ids]`` where ``max p ≥ τ`` and the id is not
        ``-1``. ``probabilities (N, C, *S)``, ``sample_ids (N, *S)`` int64 in
        ``[-1, n_samples)``."""
        max_probs, labels = _max_and_argmax(probabilities, self.n_classes)
        self._update(max_probs, labels, sample_ids)

    def pseudo_label(
        self, probabilities: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        max_probs, labels = _max_and_argmax(probabilities, self.n_classes)
        keep = self._keep(max_probs, labels)  # thresholds of the memory before this batch
        self._update(max_probs, labels, sample_ids)
        return labels, keep

    def _update(
        self, max_probs: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None
    ) -> None:
        if sample_ids is None:
            raise ValueError("FlexMatchThreshold.update needs sample_ids (N, ...): memory indices")
        if sample_ids.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8):
            raise TypeError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
        if tuple(sample_ids.shape) != tuple(labels.shape):
            raise ValueError(
                f"sample_ids have shape {tuple(sample_ids.shape)}, the probabilities "
                f"need {tuple(labels.shape)} (their shape without the class dim)"
            )
        device = self._memory.device
        ids = sample_ids.reshape(-1).to(device=device, dtype=torch.int64)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= self.n_samples:
                raise ValueError(
                    f"sample_ids must be in [-1, {self.n_samples}) (-1: no memory "
                    f"entry), got values in [{lo}, {hi}]"
                )
        chosen = (max_probs.reshape(-1) >= self.tau).to(device) & (ids >= 0)
        ids, new = ids[chosen], labels.reshape(-1).to(device)[chosen]
        if not ids.numel():
            return
        # one write per id, the last occurrence in flattened order (stable sort keeps order)
        ids, order = torch.sort(ids, stable=True)
        new = new[order]
        last = torch.ones_like(ids, dtype=torch.bool)
        last[:-1] = ids[1:] != ids[:-1]
        ids, new = ids[last], new[last]
        old = self._memory[ids].long()
        self._counts -= torch.bincount(old[old >= 0], minlength=self.n_classes)
        self._counts += torch.bincount(new, minlength=self.n_classes)
        self._memory[ids] = new.to(self._memory.dtype)

    # -- checkpointing ----------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "policy": "flexmatch",
            "n_classes": self.n_classes,
            "n_samples": self.n_samples,
            "tau": self.tau,
            "warmup": self.warmup,
            "mapping": self.mapping.value,
        }

    def state_dict(self) -> dict[str, Any]:
        """The configuration and ``memory`` (a CPU copy); σ is recomputed on load."""
        return {**self._config(), "memory": self._memory.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        config = self._config()
        differ = {k: (state.get(k), v) for k, v in config.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(
                f"{k}: checkpoint {a!r} vs policy {b!r}" for k, (a, b) in differ.items()
            )
            raise ValueError(
                f"threshold policy state does not match this policy ({detail}); "
                "build the policy with the checkpoint's settings"
            )
        memory = state.get("memory")
        if not isinstance(memory, torch.Tensor) or tuple(memory.shape) != (self.n_samples,):
            raise ValueError(
                f"threshold policy state needs a memory tensor of shape ({self.n_samples},)"
            )
        memory = memory.to(device=self._memory.device, dtype=torch.int64)
        if memory.numel() and (int(memory.min()) < -1 or int(memory.max()) >= self.n_classes):
            raise ValueError(f"memory values must be in [-1, {self.n_classes})")
        self._memory = memory.to(self._memory.dtype)
        self._counts = torch.bincount(memory[memory >= 0], minlength=self.n_classes)


class VoxelMemoryLayout:
    """Memory indices of a fixed voxel subsampling grid over the unlabeled cases (module
    docstring, "Segmentation").

    Args:
        case_shapes: each unlabeled case's preprocessed volume shape ``(Z, Y, X)`` (the cached
            model-grid array the crops are cut from), in a fixed order: the case index.
        stride: grid step in voxels, one for all axes or ``(sz, sy, sx)``; grid voxels are
            ``(gz·sz, gy·sy, gx·sx)``.
    """

    def __init__(
        self, case_shapes: Sequence[Sequence[int]], stride: int | Sequence[int] = 4
    ) -> None:
        strides = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        if len(strides) != 3 or any(int(s) < 1 for s in strides):
            raise ValueError(f"stride must be an int >= 1 or three of them (z, y, x), got {stride}")
        if not case_shapes:
            raise ValueError("no unlabeled cases: the layout needs at least one case shape")
        shapes = []
        for k, shape in enumerate(case_shapes):
            if len(shape) != 3 or any(int(n) < 1 for n in shape):
                raise ValueError(
                    f"case {k}: shape must be three sizes >= 1 (z, y, x), got {tuple(shape)}"
                )
            shapes.append(tuple(int(n) for n in shape))
        self.stride: tuple[int, int, int] = (int(strides[0]), int(strides[1]), int(strides[2]))
        self.case_shapes: list[tuple[int, ...]] = shapes
        self.grid_shapes: list[tuple[int, ...]] = [
            tuple(-(-n // s) for n, s in zip(shape, self.stride)) for shape in shapes
        ]
        sizes = [math.prod(g) for g in self.grid_shapes]
        self.offsets: list[int] = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)

    @property
    def n_cases(self) -> int:
        return len(self.case_shapes)

    @property
    def n_samples(self) -> int:
        """Total memory entries: Σ_k Π ceil(shape_k / stride)."""
        return self.offsets[-1]

    def crop_indices(
        self, case: int, start: Sequence[int], shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid voxels inside the crop ``[start, start + shape)`` of case ``case``.

        Args:
            case: case index (position in ``case_shapes``).
            start: crop corner ``(z, y, x)`` in the case's voxels; may be negative or reach past
                the volume (padding has no memory entries).
            shape: crop shape ``(wz, wy, wx)``.

        Returns:
            ``indices (M,)`` int64 memory indices and ``positions (M, 3)`` int64 ``(z, y, x)``
            inside the crop, in C order of position.
        """
        if not 0 <= case < self.n_cases:
            raise ValueError(f"case index {case} out of range [0, {self.n_cases})")
        if len(start) != 3 or len(shape) != 3 or any(int(w) < 1 for w in shape):
            raise ValueError(
                "need start (z, y, x) and shape (wz, wy, wx) >= 1, "
                f"got {tuple(start)}, {tuple(shape)}"
            )
        axes = []
        for n, s, a, w in zip(self.case_shapes[case], self.stride, start, shape):
            lo, hi = max(int(a), 0), min(int(a) + int(w), n)
            if hi <= lo:
                return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)
            axes.append(torch.arange(-(-lo // s), -(-hi // s), dtype=torch.int64))
        gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
        gz, gy, gx = gz.reshape(-1), gy.reshape(-1), gx.reshape(-1)
        _, grid_y, grid_x = self.grid_shapes[case]
        indices = self.offsets[case] + (gz * grid_y + gy) * grid_x + gx
        sz, sy, sx = self.stride
        positions = torch.stack(
            [gz * sz - int(start[0]), gy * sy - int(start[1]), gx * sx - int(start[2])], dim=1
        )
        return indices, positions

    def crop_id_map(self, case: int, start: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """Dense ``(wz, wy, wx)`` int64 map of memory indices over the crop, ``-1`` off the grid
        and outside the volume; stack crops to ``(B, Z, Y, X)`` ``sample_ids``."""
        indices, positions = self.crop_indices(case, start, shape)
        out = torch.full(tuple(int(w) for w in shape), -1, dtype=torch.int64)
        out[positions[:, 0], positions[:, 1], positions[:, 2]] = indices
        return out
