"""PatchCL (Basak & Yin, "Pseudo-label Guided Contrastive Learning for Semi-supervised Medical
Image Segmentation", CVPR 2023): class-aware patch sampling, the projection head, the per-class
embedding queues and the pseudo-label guided contrastive loss (PLGCL), in 3D.

Written from the paper (§3.1–3.4) and, where it is coherent, the official code
(hritam-98/PatchCL-MedSeg: ``utils/plg_loss.py`` ``PCGJCL``, ``utils/queues.py``
``Embedding_Queues``, ``utils/patch_utils.py`` ``_get_patches``, ``utils/get_embds.py``,
``utils/model.py`` ``Network``, ``src/train.py``). That code is 2D (natural-image leftovers) and
partly incoherent; nothing here is copied from it.

Shapes: images ``(B, 1, Z, Y, X)`` with intensities in ``[0, 1]``, class confidences
``(B, C, Z, Y, X)``, labels ``(B, Z, Y, X)``, patch corners ``(z, y, x)`` in crop voxels,
embeddings ``(P, D)`` on the unit sphere. Class 0 is background and is a class like any other
(the official ``_get_patches(..., background=True)`` samples background patches too).

One PatchCL step (§3.1–3.3, Fig. 1a)::

    sel = sample_class_patches(image01, confidence, labels, patch, stride, per_class)
    x = attended_patches(image01, confidence, sel, patch)   # I ⊙ C^k patches
    f_S = head_S(encoder_S(x)[-1])                          # student, with grad
    f_T = head_T(encoder_T(x)[-1])                          # teacher, no grad (official: an
                                                            # augmented copy of x)
    queues.enqueue(f_T, sel.cls)                            # official order: enqueue first,
    mu, sigma, present = queues.statistics()                # then statistics and the loss
    loss = plgcl_loss(f_S, sel.cls, mu, sigma, present, tau, lam, zeta)

Decisions (the paper and the official code differ or are silent):

* **Sampling.** One anchor per class per batch: among all patches of all crops that hold at
  least ``min_voxels`` voxels labelled ``k`` ("all patches containing class k or part of it"),
  the one with the highest mean confidence ``Avg^k`` (eq. 1). "The patches nearest in entropy
  are positives; the rest are negatives": the ``per_class`` candidates (anchor included) whose
  mean patch entropy ``Ent^k`` (eq. 2) is nearest the anchor's form class k's set. The loss
  does not contrast patches with each other but with the queues' class statistics (eq. 6), so
  every selected patch of class ``k`` is a query whose positives are class ``k``'s queue and
  whose negatives are the other classes' queues.
* **Hard-negative mining** (official ``utils/hard_neg_mining.py``, called in ``PCGJCL``) is not
  part of eq. 6 and is left out: the negatives' statistics are the plain queue statistics.
* **Negatives** are all *other* classes present in the queues; the official code uses only
  the classes that have patches in the current batch. With background always in the batch and
  in the queues, the two agree for two-class tasks.
* **Projection head:** pool → Linear → ReLU → Linear → L2-normalise. The official ``Network.fc``
  (2048 → 2048 → 128) also has ``BatchNorm1d`` after both linear layers; left out (a batch of a
  few patches, and a teacher in train mode, make batch statistics noisy). Hidden width 256 is ours.
* **Ignored voxels:** a negative label counts for no class, so a threshold policy's rejected
  pseudo-labels can be passed as ``labels.masked_fill(~keep, -1)``.

Values the paper leaves open (the trainer's defaults, with their source)
------------------------------------------------------------------------
* patch size ``(16, 16, 16)`` on the model grid, stride 8 — ours: 3D patches; the VNet encoder
  needs edges that are multiples of 16 (four stride-2 stages). The official 2D code uses
  contour-based patches of size 256 on 512² images.
* ``per_class = 4`` patches per class per step — ours (CPU budget). The official code passes up
  to ``contrastive_batch_size = 128`` patches through ``batch_augment``.
* ``zeta`` (ζ of eq. 6) = 4096 / (number of classes in the batch) — official ``PCGJCL``'s
  negative weight ``psi / num_classes_in_batch`` with ``psi = 4096``; 2048 for a two-class
  task (its SSL-phase call passes an unknown ``alpha=1``, so ``psi`` keeps its default 4096).
  The paper only says ζ is "a scaling factor from Σ_v", the sum over one class's negative
  keys (so ζ ~ the number of negatives per class, 4096 = a full queue). With τ = 1 and unit
  embeddings ``|fᵀμ/τ| <= 1``, so a ζ this large keeps the loss mostly in its linear regime,
  ``L ≈ log ζ + fᵀ(μ⁻ − μ⁺)/τ + λ/(2τ²)·fᵀΣ⁻f``: values near ``log ζ`` (7.6) are normal, the
  gradient stays bounded while the queues are still short, and the ``Σ⁺`` term carries little
  weight.
* ``lam = 10``, ``tau = 1`` — official SSL-phase call ``PCGJCL(..., 1, 10, ...)``; its
  contrastive warm-up uses ``tau = 0.2``, ``lam = 4``.
* ``beta = 4`` (consistency weight) and ``gamma = 0.5`` (PLGCL weight) — official
  ``loss = supervised_loss + 0.5*PCGJCL_loss + 4*consistency_loss`` (eq. 8's β, γ).
* warm-up without the contrastive term for the first 0.2 of the steps — ours, as a fraction of
  steps; the paper (§3.4) uses 50 epochs of semi-supervised warm-up (``L^Sup + L^Reg`` only).
  The official ``train.py`` instead pre-trains 100 epochs on labeled data *with* PLGCL
  (``tau = 0.2``, ``lam = 4``); we follow the paper.
* queue length 4096 and embedding dim 128 — official ``Embedding_Queues(max_length=4096)``
  and ``Network(embedding_size=128)``.
* EMA α: the trainer uses the mean teacher's ``mean_teacher.ema`` = 0.99 (UA-MT's official value)
  for the teacher network and head; the official PatchCL ``train.py`` uses 0.999
  (``0.001*student + 0.999*teacher``), which at a few hundred CPU steps would leave the teacher
  mostly at its initial weights (``--set mean_teacher.ema=0.999`` restores it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "EmbeddingQueues",
    "PatchSelection",
    "ProjectionHead",
    "attended_patches",
    "binary_entropy",
    "patch_starts",
    "plgcl_loss",
    "sample_class_patches",
]


def binary_entropy(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``F(x) = −x log x − (1 − x) log(1 − x)`` elementwise, in nats (§3.1, eq. 2).

    ``x`` in ``[0, 1]`` is clamped to ``[eps, 1 − eps]``, so ``F(0) = F(1) ≈ 0`` (about
    ``1.5e-5`` for the default eps) and ``F(0.5) = log 2``. Any shape; same shape out.
    """
    x = x.clamp(eps, 1 - eps)
    return -x * torch.log(x) - (1 - x) * torch.log1p(-x)


def _as_triple(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(v) for v in values)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be three positive (z, y, x) sizes, got {values}")
    return values  # type: ignore[return-value]


def _axis_starts(
    shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]
) -> list[list[int]]:
    """Per axis, the starts ``0, s, 2s, ...`` of the patches that fit, plus ``size − patch`` when
    the regular ones leave the end uncovered; validates the three sizes."""
    shape, patch, stride = (
        _as_triple("shape", shape),
        _as_triple("patch", patch),
        _as_triple("stride", stride),
    )
    if any(p > s for p, s in zip(patch, shape)):
        raise ValueError(
            f"patch {patch} does not fit in crop {shape}: every patch edge must be <= the crop's"
        )
    axes = []
    for size, p, st in zip(shape, patch, stride):
        starts = list(range(0, size - p + 1, st))
        if starts[-1] + p < size:
            starts.append(size - p)
        axes.append(starts)
    return axes


def patch_starts(
    shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Corners ``(z, y, x)`` of the patches that tile a crop.

    Per axis the starts are ``0, stride, 2·stride, ...`` while the patch fits, and the last
    patch is flush with the end of the crop (``shape − patch``) when the regular ones leave voxels
    uncovered, so every voxel is in some patch (given ``stride <= patch``). The corners are in C
    order (z slowest, x fastest); this order is the patch index ``j`` used by
    :func:`sample_class_patches`.

    Args:
        shape: crop size ``(Z, Y, X)`` in voxels.
        patch: patch size ``(pz, py, px)``, ``<= shape`` per axis.
        stride: step between patch corners ``(sz, sy, sx)``, >= 1.

    Raises:
        ValueError: a size is not three positive integers, or a patch edge exceeds the crop's.
    """
    return list(itertools.product(*_axis_starts(shape, patch, stride)))


@dataclass(frozen=True)
class PatchSelection:
    """Patches picked by :func:`sample_class_patches`, ``P`` of them, grouped by class.

    Attributes:
        batch: ``(P,)`` int64, the crop of the batch each patch is cut from.
        start: ``(P, 3)`` int64, the patch corner ``(z, y, x)`` in crop voxels.
        cls: ``(P,)`` int64, the class ``k`` the patch was sampled for (the attended image
            ``I ⊙ C^k`` is cut there, and the patch's embedding is a query of class ``k``).
    """

    batch: Tensor
    start: Tensor
    cls: Tensor

    def __post_init__(self) -> None:
        n = self.batch.shape[0] if self.batch.ndim == 1 else -1
        if self.batch.shape != (n,) or self.cls.shape != (n,) or self.start.shape != (n, 3):
            raise ValueError(
                f"need batch (P,), start (P, 3), cls (P,); got {tuple(self.batch.shape)}, "
                f"{tuple(self.start.shape)}, {tuple(self.cls.shape)}"
            )

    def __len__(self) -> int:
        return int(self.batch.shape[0])


def _window_sums(
    volume: Tensor, starts: Sequence[Sequence[int]], patch: tuple[int, int, int]
) -> Tensor:
    """Sums of ``volume (B, C, Z, Y, X)`` over the windows ``starts[a][i] .. + patch[a]`` per
    axis: ``(B, C, nz, ny, nx)``. Separable (one axis at a time); identical windows give
    identical sums."""
    for axis, (axis_starts, p) in enumerate(zip(starts, patch), start=2):
        index = torch.tensor(axis_starts, dtype=torch.long, device=volume.device)
        volume = volume.unfold(axis, p, 1).index_select(axis, index).sum(-1)
    return volume


def _check_volumes(image01: Tensor, confidence: Tensor) -> None:
    if image01.ndim != 5 or image01.shape[1] != 1:
        raise ValueError(f"image01 must be (B, 1, Z, Y, X), got {tuple(image01.shape)}")
    if (
        confidence.ndim != 5
        or confidence.shape[0] != image01.shape[0]
        or confidence.shape[2:] != image01.shape[2:]
    ):
        raise ValueError(
            f"confidence must be (B, C, Z, Y, X) matching image01 {tuple(image01.shape)}, "
            f"got {tuple(confidence.shape)}"
        )


@torch.no_grad()
def sample_class_patches(
    image01: Tensor,
    confidence: Tensor,
    labels: Tensor,
    patch: Sequence[int],
    stride: Sequence[int],
    per_class: int,
    min_voxels: int = 1,
) -> PatchSelection:
    """Class-aware patch sampling (§3.1).

    For every class ``k`` the attended image is ``I'^k = I ⊙ C^k``. Every crop ``i`` is tiled by
    :func:`patch_starts` (patch index ``j``); for every patch ``P_{i,j}``:

    * ``Avg^k_{i,j}`` = mean of ``C^k`` over the patch (eq. 1), its class-``k`` confidence;
    * ``Ent^k_{i,j}`` = mean of ``F(I'^k)`` over the patch, ``F`` = :func:`binary_entropy`
      (eq. 2): it mixes the confidence in ``k``, the uncertainty against the other classes and
      the intensity appearance.

    Per class ``k`` (background, class 0, included: the official code treats it as a class):

    1. candidates: the patches, over all crops of the batch, holding at least ``min_voxels``
       voxels labelled ``k`` ("all patches containing class k (or some part of it)");
    2. the anchor: the candidate with the highest ``Avg^k``;
    3. "the patches with the N nearest Ent^k values are positives; the rest are negatives": class
       ``k``'s set is the ``per_class`` candidates nearest the anchor in ``Ent^k``, the anchor
       first, then by increasing ``|Ent^k − Ent^k_anchor|``.

    Ties (in ``Avg^k`` for the anchor, in entropy distance) go to the lower candidate index
    ``i·J + j`` (crop first, then patch); the result is a deterministic function of the inputs.
    A class without candidates is absent from the result; fewer than ``per_class`` candidates
    are all taken. A patch can be selected for more than one class (it holds voxels of each).

    Args:
        image01: ``(B, 1, Z, Y, X)`` intensities in ``[0, 1]``.
        confidence: ``(B, C, Z, Y, X)`` class confidences ``C^k`` in ``[0, 1]``: one-hot ground
            truth for labeled crops, the teacher's softmax for unlabeled ones.
        labels: ``(B, Z, Y, X)`` integer classes (ground truth or pseudo-labels) in ``[0, C)``;
            a negative value marks a voxel that counts for no class (e.g. a pseudo-label a
            threshold policy rejected: ``labels.masked_fill(~keep, -1)``).
        patch: patch size ``(pz, py, px)`` in voxels.
        stride: step between patch corners ``(sz, sy, sx)``.
        per_class: patches per class, >= 1 (anchor included).
        min_voxels: voxels of class ``k`` a patch needs to be a class-``k`` candidate, >= 1.

    Returns:
        The selection, classes in increasing order, each class's patches as in step 3.

    Raises:
        ValueError: shapes that do not match, values outside ``[0, 1]``, labels ``>= C``, or
            ``per_class`` / ``min_voxels`` below 1.
    """
    _check_volumes(image01, confidence)
    if labels.shape != (image01.shape[0], *image01.shape[2:]):
        raise ValueError(
            f"labels must be (B, Z, Y, X) = {(image01.shape[0], *image01.shape[2:])}, "
            f"got {tuple(labels.shape)}"
        )
    if per_class < 1 or min_voxels < 1:
        raise ValueError(f"need per_class >= 1 and min_voxels >= 1, got {per_class}, {min_voxels}")
    n_classes = confidence.shape[1]
    for name, values in (("image01", image01), ("confidence", confidence)):
        if values.numel() and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"{name} must lie in [0, 1], got [{float(values.min())}, {float(values.max())}]"
            )
    if labels.numel() and labels.max() >= n_classes:
        raise ValueError(
            f"labels must be < C = {n_classes} (negative: ignored), got {int(labels.max())}"
        )

    patch = _as_triple("patch", patch)
    axis_starts = _axis_starts(image01.shape[2:], patch, stride)
    corners = list(itertools.product(*axis_starts))  # = patch_starts(...): patch index j
    volume = float(math.prod(patch))
    dtype = torch.promote_types(confidence.dtype, torch.float32)
    conf = confidence.to(dtype)
    one_hot = (
        labels.unsqueeze(1) == torch.arange(n_classes, device=labels.device).view(1, -1, 1, 1, 1)
    ).to(dtype)
    # (B, C, J) per-patch statistics; J patches per crop in patch_starts order.
    avg = _window_sums(conf, axis_starts, patch).flatten(2) / volume
    ent = (
        _window_sums(binary_entropy(image01.to(dtype) * conf), axis_starts, patch).flatten(2)
        / volume
    )
    count = _window_sums(one_hot, axis_starts, patch).flatten(2)

    n_patches = len(corners)
    corner_table = torch.tensor(corners, dtype=torch.long, device=image01.device)
    picked: list[Tensor] = []
    picked_cls: list[Tensor] = []
    for k in range(n_classes):
        candidates = (count[:, k].reshape(-1) >= min_voxels).nonzero().squeeze(1)
        if candidates.numel() == 0:
            continue
        cand_avg = avg[:, k].reshape(-1)[candidates]
        cand_ent = ent[:, k].reshape(-1)[candidates]
        anchor = int(torch.argmax(cand_avg))  # the first maximum: ties go to the lower index
        distance = (cand_ent - cand_ent[anchor]).abs()
        distance[anchor] = -1.0  # the anchor first, even against an entropy twin of lower index
        order = torch.sort(distance, stable=True).indices[:per_class]
        picked.append(candidates[order])
        picked_cls.append(torch.full((order.numel(),), k, dtype=torch.long, device=image01.device))
    flat = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long, device=image01.device)
    cls = (
        torch.cat(picked_cls)
        if picked_cls
        else torch.zeros(0, dtype=torch.long, device=image01.device)
    )
    return PatchSelection(batch=flat // n_patches, start=corner_table[flat % n_patches], cls=cls)


@torch.no_grad()
def attended_patches(
    image01: Tensor, confidence: Tensor, selection: PatchSelection, patch: Sequence[int]
) -> Tensor:
    """The encoder input: the attended image ``I'^k = I ⊙ C^k`` cut at each selected patch.

    ``k = selection.cls``; the official code too feeds image × class-mask patches to the encoder
    (``patch_utils.py``). Pure data: computed without gradients.

    Args:
        image01: ``(B, 1, Z, Y, X)``.
        confidence: ``(B, C, Z, Y, X)``.
        selection: the patches, from :func:`sample_class_patches` with the same ``patch``.
        patch: patch size ``(pz, py, px)``.

    Returns:
        ``(P, 1, pz, py, px)`` in the promoted dtype of ``image01`` and ``confidence``.

    Raises:
        ValueError: shapes that do not match, or a patch that does not lie inside the crop.
    """
    _check_volumes(image01, confidence)
    pz, py, px = _as_triple("patch", patch)
    device = image01.device
    batch, start, cls = (t.to(device) for t in (selection.batch, selection.start, selection.cls))
    end = start + torch.tensor([pz, py, px], device=device)
    limit = torch.tensor(image01.shape[2:], device=device)
    if len(selection) and (
        start.min() < 0
        or (end > limit).any()
        or batch.min() < 0
        or batch.max() >= image01.shape[0]
        or cls.min() < 0
        or cls.max() >= confidence.shape[1]
    ):
        raise ValueError(
            f"selection does not index patches {(pz, py, px)} of image01 {tuple(image01.shape)} "
            f"and confidence {tuple(confidence.shape)}"
        )
    b = batch.view(-1, 1, 1, 1)
    k = cls.view(-1, 1, 1, 1)
    z = (start[:, 0:1] + torch.arange(pz, device=device)).view(-1, pz, 1, 1)
    y = (start[:, 1:2] + torch.arange(py, device=device)).view(-1, 1, py, 1)
    x = (start[:, 2:3] + torch.arange(px, device=device)).view(-1, 1, 1, px)
    attended = image01[b, 0, z, y, x] * confidence[b, k, z, y, x]
    return attended.unsqueeze(1)


class ProjectionHead(nn.Module):
    """Projection head ``H`` (§3.1: "encoder E_S and projection head H_S"; official
    ``Network.fc`` + ``get_embds.py``): global average pool → Linear → ReLU → Linear →
    L2-normalise, so embeddings lie on the unit sphere.

    ``forward(features (P, Cf, z, y, x)) -> (P, out_dim)``, ``features`` the deepest encoder
    features of the attended patches (``Cf = in_channels``).
    """

    def __init__(self, in_channels: int, hidden: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        if min(in_channels, hidden, out_dim) < 1:
            raise ValueError(
                f"need in_channels, hidden, out_dim >= 1, got {in_channels}, {hidden}, {out_dim}"
            )
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 5:
            raise ValueError(f"features must be (P, C, z, y, x), got {tuple(features.shape)}")
        return F.normalize(self.mlp(features.mean(dim=(2, 3, 4))), dim=1)


class EmbeddingQueues:
    """Per-class FIFO queues of (teacher) embeddings (official ``utils/queues.py``
    ``Embedding_Queues``: one queue per class, the newest ``length`` kept).

    Stored as a ring buffer ``(C, length, D)`` float32 with per-class fill counts and write
    pointers. Slots ``0 .. fill − 1`` of a class hold its embeddings (all of them once full).
    """

    def __init__(
        self,
        n_classes: int,
        dim: int = 128,
        length: int = 4096,
        device: torch.device | str | None = None,
    ) -> None:
        if min(n_classes, dim, length) < 1:
            raise ValueError(f"need n_classes, dim, length >= 1, got {n_classes}, {dim}, {length}")
        self.n_classes, self.dim, self.length = n_classes, dim, length
        self.buffer = torch.zeros(n_classes, length, dim, dtype=torch.float32, device=device)
        self.fill = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.pointer = torch.zeros(n_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, cls: Tensor) -> None:
        """Append ``embeddings (P, D)`` (detached) to the queues of ``cls (P,)``, in row order;
        a queue over ``length`` drops its oldest entries."""
        if (
            embeddings.ndim != 2
            or embeddings.shape[1] != self.dim
            or cls.shape != (embeddings.shape[0],)
        ):
            raise ValueError(
                f"need embeddings (P, {self.dim}) and cls (P,), got {tuple(embeddings.shape)} "
                f"and {tuple(cls.shape)}"
            )
        if cls.numel() and (cls.min() < 0 or cls.max() >= self.n_classes):
            raise ValueError(
                f"cls must lie in [0, {self.n_classes}), got [{int(cls.min())}, {int(cls.max())}]"
            )
        embeddings = embeddings.detach().to(self.buffer)
        cls = cls.to(self.buffer.device)
        for k in torch.unique(cls).tolist():
            new = embeddings[cls == k][-self.length :]
            n = new.shape[0]
            slots = (self.pointer[k] + torch.arange(n, device=self.buffer.device)) % self.length
            self.buffer[k, slots] = new
            self.pointer[k] = (self.pointer[k] + n) % self.length
            self.fill[k] = torch.clamp(self.fill[k] + n, max=self.length)

    def counts(self) -> Tensor:
        """``(C,)`` int64: embeddings held per class."""
        return self.fill.clone()

    @torch.no_grad()
    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-class mean and biased covariance of the queue (official ``PCGJCL``:
        ``mu = mean``, ``sig = (t − mu)ᵀ(t − mu) / n``).

        Returns:
            ``means (C, D)``, ``covariances (C, D, D)`` and ``present (C,)`` bool (count >= 1);
            zeros for absent classes.
        """
        held = (torch.arange(self.length, device=self.buffer.device) < self.fill[:, None]).to(
            self.buffer
        )
        n = self.fill.clamp(min=1).to(self.buffer)[:, None]
        means = torch.einsum("cl,cld->cd", held, self.buffer) / n
        centred = (self.buffer - means[:, None]) * held[..., None]
        covariances = torch.einsum("cld,cle->cde", centred, centred) / n[..., None]
        return means, covariances, self.fill > 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (tensors on the CPU; ``torch.save``-able)."""
        return {
            "n_classes": self.n_classes,
            "dim": self.dim,
            "length": self.length,
            "buffer": self.buffer.cpu().clone(),
            "fill": self.fill.cpu().clone(),
            "pointer": self.pointer.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the queue shape must match this one's."""
        shape = (state["n_classes"], state["dim"], state["length"])
        if shape != (self.n_classes, self.dim, self.length):
            raise ValueError(
                f"queue state has (n_classes, dim, length) = {shape}, this queue "
                f"{(self.n_classes, self.dim, self.length)}"
            )
        self.buffer.copy_(state["buffer"])
        self.fill.copy_(state["fill"])
        self.pointer.copy_(state["pointer"])


def plgcl_loss(
    embeddings: Tensor,
    cls: Tensor,
    means: Tensor,
    covariances: Tensor,
    present: Tensor,
    tau: float,
    lam: float,
    zeta: float,
) -> Tensor:
    """Pseudo-label guided contrastive loss (PLGCL, §3.2, eq. 6), mean over anchors.

    For anchor ``u`` of class ``k = cls[u]`` with embedding ``f``, and ``a_c = fᵀμ_c/τ +
    λ/(2τ²)·fᵀΣ_c f``::

        L_u = log[ exp(a_k) + ζ·Σ_{c ≠ k, present} exp(a_c) ] − fᵀμ_k/τ

    computed as ``logsumexp`` over ``[a_k, a_c + log ζ]``. With λ = 0 this is InfoNCE against the
    class means with the negatives weighted ζ; with only class ``k`` present it is
    ``λ/(2τ²)·fᵀΣ_k f``. Anchors of a class absent from the queues are skipped.

    Args:
        embeddings: ``(P, D)`` student embeddings (L2-normalised).
        cls: ``(P,)`` int64 class of each anchor, in ``[0, C)``.
        means, covariances, present: :meth:`EmbeddingQueues.statistics` — ``(C, D)``,
            ``(C, D, D)``, ``(C,)`` bool.
        tau: temperature τ > 0.
        lam: λ >= 0, the weight of the covariance terms.
        zeta: ζ > 0, the weight of each negative class (official ``psi / num_classes_in_batch``).

    Returns:
        Scalar: ``Σ_u L_u / #anchors counted``; a zero that keeps ``embeddings``' graph when no
        anchor counts.
    """
    if tau <= 0 or lam < 0 or zeta <= 0:
        raise ValueError(f"need tau > 0, lam >= 0 and zeta > 0, got {tau}, {lam}, {zeta}")
    n_classes, dim = means.shape
    if (
        embeddings.ndim != 2
        or embeddings.shape[1] != dim
        or cls.shape != (embeddings.shape[0],)
        or covariances.shape != (n_classes, dim, dim)
        or present.shape != (n_classes,)
    ):
        raise ValueError(
            f"need embeddings (P, D), cls (P,), means (C, D), covariances (C, D, D), present (C,); "
            f"got {tuple(embeddings.shape)}, {tuple(cls.shape)}, {tuple(means.shape)}, "
            f"{tuple(covariances.shape)}, {tuple(present.shape)}"
        )
    if cls.numel() and (cls.min() < 0 or cls.max() >= n_classes):
        raise ValueError(
            f"cls must lie in [0, {n_classes}), got [{int(cls.min())}, {int(cls.max())}]"
        )
    present = present.to(device=embeddings.device, dtype=torch.bool)
    cls = cls.to(embeddings.device)
    counted = present[cls]
    if not bool(counted.any()):
        return embeddings.sum() * 0
    dtype = torch.promote_types(embeddings.dtype, means.dtype)
    f = embeddings[counted].to(dtype)
    k = cls[counted]
    mean_term = f @ means.to(dtype).T / tau  # (U, C): fᵀμ_c/τ
    spread = torch.einsum("ud,cde,ue->uc", f, covariances.to(dtype), f) * (lam / (2 * tau**2))
    positive = F.one_hot(k, n_classes).bool()
    logits = mean_term + spread + torch.where(positive, 0.0, math.log(zeta))
    logits = logits.masked_fill(~present[None, :], float("-inf"))
    return (torch.logsumexp(logits, dim=1) - mean_term.gather(1, k[:, None]).squeeze(1)).mean()
