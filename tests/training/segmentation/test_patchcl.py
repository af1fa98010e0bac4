"""PatchCL's parts against hand-computed values: the entropy F, the patch grid, class-aware patch
sampling, attended patches, the projection head, the embedding queues and the PLGCL loss (eq. 6).

References: Basak & Yin, CVPR 2023, §3.1-3.2; hritam-98/PatchCL-MedSeg ``utils/plg_loss.py``,
``utils/queues.py``.
"""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")
import itertools

from torch.nn import functional as F

from medssl.training.segmentation.patchcl import (
    EmbeddingQueues,
    PatchSelection,
    ProjectionHead,
    attended_patches,
    binary_entropy,
    patch_starts,
    plgcl_loss,
    sample_class_patches,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def closed_entropy(x: float) -> float:
    return -x * math.log(x) - (1 - x) * math.log(1 - x)


# --- F(x) -------------------------------------------------------------------------------------


def test_binary_entropy_matches_the_closed_form_and_vanishes_at_0_and_1():
    out = binary_entropy(torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    assert out[0] == pytest.approx(0.0, abs=2e-5) and out[1] == pytest.approx(0.0, abs=2e-5)
    assert out[2] == pytest.approx(math.log(2), rel=1e-12)
    assert out[3] == pytest.approx(0.25 * math.log(4) + 0.75 * math.log(4 / 3), rel=1e-12)


# --- the patch grid ---------------------------------------------------------------------------


def test_patch_starts_tile_in_c_order():
    assert patch_starts((8, 8, 8), (4, 4, 4), (4, 4, 4)) == [
        (0, 0, 0),
        (0, 0, 4),
        (0, 4, 0),
        (0, 4, 4),
        (4, 0, 0),
        (4, 0, 4),
        (4, 4, 0),
        (4, 4, 4),
    ]


def test_patch_starts_add_a_last_patch_flush_with_the_end():
    corners = patch_starts((10, 4, 6), (4, 4, 4), (4, 2, 4))
    assert sorted({c[0] for c in corners}) == [0, 4, 6]  # 0, 4 regular; 6 = 10 - 4 flush
    assert sorted({c[1] for c in corners}) == [0]  # the patch fills the axis
    assert sorted({c[2] for c in corners}) == [0, 2]
    assert len(corners) == 6


def test_patch_starts_reject_a_patch_larger_than_the_crop_or_a_zero_stride():
    with pytest.raises(ValueError, match="does not fit"):
        patch_starts((8, 8, 8), (4, 16, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="stride"):
        patch_starts((8, 8, 8), (4, 4, 4), (4, 0, 4))


# --- class-aware sampling ---------------------------------------------------------------------
#
# One 8³ crop, patches 4³ with stride 4: 8 patches, index j = 4·iz + 2·iy + ix,
# corner 4·(iz, iy, ix).
# Every patch is uniform: C^1 = v_j, C^0 = 1 − v_j, C^2 = 0; image 1 (so I'^k = C^k).
V = [0.9, 0.8, 0.6, 0.3, 0.15, 0.1, 0.05, 0.5]
# Labels: class 1 fills patches 0-3, patch 4 holds one class-1 voxel (its corner) in class 0,
# patches 5-7 are class 0; class 2 has no voxel.
# Class 1: candidates 0-4, Avg^1 = v -> anchor 0; Ent^1 = F(v): F(.9) = .3251, F(.8) = .5004,
#   F(.6) = .6730, F(.3) = .6109, F(.15) = .4227 -> distances to the anchor: patch 4 .0976,
#   1 .1753, 3 .2858, 2 .3479.
# Class 0: candidates 4-7, Avg^0 = .85, .9, .95, .5 -> anchor 6; Ent^0 = F(1 - v) = .4227, .3251,
#   .1985, .6931 -> distances: 5 .1266, 4 .2242, 7 .4946.
CORNERS = patch_starts((8, 8, 8), (4, 4, 4), (4, 4, 4))


def blocks(values: list[float]) -> torch.Tensor:
    """``(8, 8, 8)``: patch j filled with values[j]."""
    grid = torch.tensor(values, dtype=torch.float32).view(2, 2, 2)
    return grid.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat_interleave(4, 2)


def toy_batch(
    image_values: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = blocks(V)
    confidence = torch.stack([1 - v, v, torch.zeros_like(v)])[None]
    image = blocks(image_values or [1.0] * 8)[None, None]
    labels = blocks([1, 1, 1, 1, 0, 0, 0, 0]).long()[None]
    labels[0, 4, 0, 0] = 1  # patch 4's corner voxel
    return image, confidence, labels


def picked(selection: PatchSelection, k: int) -> list[tuple[int, int]]:
    """``(crop, patch index)`` of class k's patches, in the selection's order."""
    rows = (selection.cls == k).nonzero().squeeze(1).tolist()
    return [
        (int(selection.batch[r]), CORNERS.index(tuple(selection.start[r].tolist()))) for r in rows
    ]


def test_sampling_takes_the_most_confident_anchor_and_its_nearest_patches_in_entropy():
    selection = sample_class_patches(*toy_batch(), (4, 4, 4), (4, 4, 4), per_class=3)
    assert selection.cls.tolist() == [0, 0, 0, 1, 1, 1]  # class 2 (no voxel) is absent
    assert picked(selection, 0) == [(0, 6), (0, 5), (0, 4)]
    # patch 4 is the least confident class-1 candidate but the nearest in entropy
    assert picked(selection, 1) == [(0, 0), (0, 4), (0, 1)]
    assert len(selection) == 6
    assert selection.batch.dtype == selection.start.dtype == selection.cls.dtype == torch.int64


def test_sampling_honours_min_voxels_and_ignored_labels():
    image, confidence, labels = toy_batch()
    selection = sample_class_patches(
        image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=3, min_voxels=2
    )
    assert picked(selection, 1) == [(0, 0), (0, 1), (0, 3)]  # patch 4's single voxel is too few
    labels[0, 4, 0, 0] = -1  # a rejected pseudo-label counts for no class
    selection = sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=3)
    assert picked(selection, 1) == [(0, 0), (0, 1), (0, 3)]


def test_sampling_entropy_sees_the_image_intensity():
    # patch 1 at intensity 0.125: I'^1 = 0.1, F(0.1) = F(0.9), the anchor's entropy -> nearest
    image, confidence, labels = toy_batch([1.0, 0.125, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    selection = sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=3)
    assert picked(selection, 1) == [(0, 0), (0, 1), (0, 4)]


def test_sampling_pools_the_batch_and_breaks_ties_by_lower_index_deterministically():
    image, confidence, labels = (torch.cat([t, t]) for t in toy_batch())  # two identical crops
    first = sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=3)
    # anchor: crop 0's patch 0 (tie in Avg with crop 1's); its twin at distance 0; then patch 4
    # of crops 0 and 1 at equal distance: crop 0 first
    assert picked(first, 1) == [(0, 0), (1, 0), (0, 4)]
    again = sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=3)
    for a, b in ((first.batch, again.batch), (first.start, again.start), (first.cls, again.cls)):
        assert torch.equal(a, b)


def test_sampling_uses_the_flush_last_patch_and_takes_all_of_few_candidates():
    image = torch.ones(1, 1, 4, 4, 6)
    labels = torch.zeros(1, 4, 4, 6, dtype=torch.long)
    labels[0, 0, 0, 5] = 1  # only the flush patch at x = 2 holds class 1
    confidence = torch.cat(
        [
            1 - F.one_hot(labels, 2).movedim(-1, 1)[:, 1:].float(),
            F.one_hot(labels, 2).movedim(-1, 1)[:, 1:].float(),
        ],
        dim=1,
    )
    selection = sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=5)
    assert selection.cls.tolist() == [0, 0, 1]
    assert selection.start[selection.cls == 1].tolist() == [[0, 0, 2]]


def test_sampling_rejects_bad_inputs():
    image, confidence, labels = toy_batch()
    with pytest.raises(ValueError, match="labels must be < C"):
        sample_class_patches(image, confidence, labels + 3, (4, 4, 4), (4, 4, 4), per_class=1)
    with pytest.raises(ValueError, match=r"image01 must lie in \[0, 1\]"):
        sample_class_patches(image * 2, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=1)
    with pytest.raises(ValueError, match="per_class"):
        sample_class_patches(image, confidence, labels, (4, 4, 4), (4, 4, 4), per_class=0)


def test_attended_patches_cut_image_times_class_confidence():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 6, 8, 10, generator=gen)
    confidence = torch.rand(2, 3, 6, 8, 10, generator=gen).requires_grad_()
    selection = PatchSelection(
        batch=torch.tensor([1, 0]),
        start=torch.tensor([[2, 4, 6], [0, 0, 0]]),
        cls=torch.tensor([2, 1]),
    )
    out = attended_patches(image, confidence, selection, (4, 4, 4))
    assert out.shape == (2, 1, 4, 4, 4) and not out.requires_grad
    assert torch.equal(
        out[0, 0], image[1, 0, 2:6, 4:8, 6:10] * confidence[1, 2, 2:6, 4:8, 6:10].detach()
    )
    assert torch.equal(
        out[1, 0], image[0, 0, 0:4, 0:4, 0:4] * confidence[0, 1, 0:4, 0:4, 0:4].detach()
    )
    outside = PatchSelection(
        batch=torch.tensor([0]), start=torch.tensor([[3, 0, 0]]), cls=torch.tensor([0])
    )
    with pytest.raises(ValueError, match="does not index"):
        attended_patches(image, confidence, outside, (4, 4, 4))


def test_projection_head_gives_unit_embeddings():
    head = ProjectionHead(in_channels=12, hidden=16, out_dim=8)
    out = head(torch.randn(5, 12, 2, 2, 2))
    assert out.shape == (5, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


# --- the queues -------------------------------------------------------------------------------


def test_queues_keep_the_newest_entries_per_class_fifo():
    queues = EmbeddingQueues(n_classes=3, dim=2, length=3)
    rows = torch.arange(10, dtype=torch.float32).view(5, 2)  # five distinct embeddings
    queues.enqueue(rows, torch.zeros(5, dtype=torch.long))
    assert queues.counts().tolist() == [3, 0, 0]
    means, _, present = queues.statistics()
    torch.testing.assert_close(means[0], rows[2:].mean(0))  # the last three
    assert present.tolist() == [True, False, False]
    queues.enqueue(torch.tensor([[100.0, 100.0], [7.0, 7.0]]), torch.tensor([0, 1]))
    means, _, _ = queues.statistics()
    torch.testing.assert_close(
        means[0], torch.cat([rows[3:], torch.tensor([[100.0, 100.0]])]).mean(0)
    )
    torch.testing.assert_close(means[1], torch.tensor([7.0, 7.0]))
    queues.enqueue(
        torch.tensor([[1.0, 0.0]] * 7), torch.zeros(7, dtype=torch.long)
    )  # > length at once
    means, covariances, _ = queues.statistics()
    torch.testing.assert_close(means[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(covariances[0], torch.zeros(2, 2))


def test_queue_statistics_match_torch_mean_and_biased_cov_and_are_zero_when_absent():
    gen = torch.Generator().manual_seed(1)
    queues = EmbeddingQueues(n_classes=4, dim=5, length=16)
    data = torch.randn(30, 5, generator=gen)
    cls = torch.randint(0, 3, (30,), generator=gen)  # class 3 never enqueued
    queues.enqueue(data[:20], cls[:20])
    queues.enqueue(data[20:].requires_grad_(), cls[20:])
    means, covariances, present = queues.statistics()
    assert not means.requires_grad and present.tolist() == [True, True, True, False]
    for k in range(3):
        held = data[cls == k][-16:]
        assert queues.counts()[k] == held.shape[0]
        torch.testing.assert_close(means[k], held.mean(0))
        torch.testing.assert_close(covariances[k], torch.cov(held.T, correction=0))
    assert not means[3].any() and not covariances[3].any()


def test_queue_state_dict_round_trips_exactly_through_torch_save():
    gen = torch.Generator().manual_seed(2)
    queues = EmbeddingQueues(n_classes=2, dim=3, length=4)
    queues.enqueue(torch.randn(7, 3, generator=gen), torch.tensor([0, 1, 0, 0, 1, 0, 0]))
    buffer = io.BytesIO()
    torch.save(queues.state_dict(), buffer)
    buffer.seek(0)
    restored = EmbeddingQueues(n_classes=2, dim=3, length=4)
    restored.load_state_dict(torch.load(buffer))
    more, more_cls = torch.randn(3, 3, generator=gen), torch.tensor([0, 0, 1])
    queues.enqueue(more, more_cls)  # the write pointer must be restored too
    restored.enqueue(more, more_cls)
    for a, b in zip(queues.statistics(), restored.statistics()):
        assert torch.equal(a, b)
    assert torch.equal(queues.buffer, restored.buffer) and torch.equal(
        queues.counts(), restored.counts()
    )
    with pytest.raises(ValueError, match="queue state"):
        EmbeddingQueues(n_classes=2, dim=3, length=5).load_state_dict(queues.state_dict())


# --- PLGCL (eq. 6) ----------------------------------------------------------------------------


def random_statistics(
    n_classes: int = 4, dim: int = 8, seed: int = 3, absent: tuple[int, ...] = ()
):
    """Queue statistics of clustered unit embeddings, ``present`` False for ``absent``."""
    gen = torch.Generator().manual_seed(seed)
    queues = EmbeddingQueues(n_classes, dim, length=64)
    centres = F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1)
    for k in set(range(n_classes)) - set(absent):
        samples = F.normalize(centres[k] + 0.3 * torch.randn(20 + 5 * k, dim, generator=gen), dim=1)
        queues.enqueue(samples, torch.full((samples.shape[0],), k))
    return queues.statistics()


def anchors(
    n: int = 12, n_classes: int = 4, dim: int = 8, seed: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=gen), dim=1), torch.arange(n) % n_classes)


def infonce_reference(
    f: torch.Tensor,
    cls: torch.Tensor,
    means: torch.Tensor,
    present: torch.Tensor,
    tau: float,
    zeta: float,
) -> torch.Tensor:
    """−log(exp(fᵀμ⁺/τ) / (exp(fᵀμ⁺/τ) + ζ Σ exp(fᵀμ⁻/τ))) by cross-entropy over present classes."""
    logits = f @ means.T / tau + math.log(zeta) * (1 - F.one_hot(cls, means.shape[0]))
    logits = logits.masked_fill(~present, float("-inf"))
    return F.cross_entropy(logits, cls)


def test_plgcl_without_covariance_is_infonce_against_the_class_means():
    means, covariances, present = random_statistics()
    f, cls = anchors()
    loss = plgcl_loss(f, cls, means, covariances, present, tau=0.5, lam=0.0, zeta=7.0)
    torch.testing.assert_close(loss, infonce_reference(f, cls, means, present, 0.5, 7.0))
    # an absent class is no negative
    means, covariances, present = random_statistics(absent=(2,))
    keep = cls != 2
    loss = plgcl_loss(f[keep], cls[keep], means, covariances, present, tau=0.5, lam=0.0, zeta=7.0)
    torch.testing.assert_close(
        loss, infonce_reference(f[keep], cls[keep], means, present, 0.5, 7.0)
    )


def test_plgcl_decreases_as_an_embedding_moves_to_its_class_mean():
    means, covariances, present = random_statistics()
    start = F.normalize(means[1], dim=0)  # starts on class 1's mean, an anchor of class 0
    losses = []
    for t in torch.linspace(0, 1, 8):
        f = F.normalize((1 - t) * start + t * means[0], dim=0)[None]
        losses.append(
            float(
                plgcl_loss(
                    f,
                    torch.tensor([0]),
                    means,
                    covariances,
                    present,
                    tau=1.0,
                    lam=10.0,
                    zeta=2048.0,
                )
            )
        )
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_plgcl_with_a_single_class_present_is_its_covariance_term():
    means, covariances, present = random_statistics(absent=(1, 2, 3))
    f, _ = anchors(n=5)
    cls = torch.zeros(5, dtype=torch.long)
    tau, lam = 0.03, 10.0
    loss = plgcl_loss(f, cls, means, covariances, present, tau=tau, lam=lam, zeta=2048.0)
    per_anchor = lam / (2 * tau**2) * torch.einsum("ud,de,ue->u", f, covariances[0], f)
    assert per_anchor.min() > 89  # exp() of each overflows float32; the loss must not
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, per_anchor.mean())


def test_plgcl_matches_a_per_anchor_loop():
    means, covariances, present = random_statistics(n_classes=5, absent=(3,))
    f, cls = anchors(n=15, n_classes=5)
    tau, lam, zeta = 0.7, 4.0, 300.0
    per_anchor = []
    for u in range(len(cls)):
        k = int(cls[u])
        if not present[k]:
            continue
        fu = f[u].double()
        a = [
            float(
                fu @ means[c].double() / tau
                + lam / (2 * tau**2) * fu @ covariances[c].double() @ fu
            )
            for c in range(5)
        ]
        negatives = sum(math.exp(a[c]) for c in range(5) if c != k and present[c])
        per_anchor.append(
            math.log(math.exp(a[k]) + zeta * negatives) - float(fu @ means[k].double()) / tau
        )
    loss = plgcl_loss(f, cls, means, covariances, present, tau=tau, lam=lam, zeta=zeta)
    assert len(per_anchor) == 12  # the three anchors of absent class 3 are skipped
    assert float(loss) == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-5)


def test_plgcl_skips_anchors_of_absent_classes_and_passes_gradients():
    means, covariances, present = random_statistics(absent=(3,))
    raw, cls = anchors()
    raw.requires_grad_()
    loss = plgcl_loss(
        F.normalize(raw, dim=1), cls, means, covariances, present, tau=1.0, lam=10.0, zeta=2048.0
    )
    keep = cls != 3
    alone = plgcl_loss(
        F.normalize(raw[keep], dim=1),
        cls[keep],
        means,
        covariances,
        present,
        tau=1.0,
        lam=10.0,
        zeta=2048.0,
    )
    torch.testing.assert_close(loss, alone)
    loss.backward()
    assert torch.isfinite(raw.grad).all()
    assert raw.grad[keep].abs().sum(1).gt(0).all() and not raw.grad[~keep].any()


def test_plgcl_is_a_zero_with_a_graph_when_no_anchor_counts():
    means, covariances, present = random_statistics(absent=(0, 1, 2, 3))
    raw, cls = anchors()
    raw.requires_grad_()
    loss = plgcl_loss(raw, cls, means, covariances, present, tau=1.0, lam=10.0, zeta=2048.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert not raw.grad.any()
